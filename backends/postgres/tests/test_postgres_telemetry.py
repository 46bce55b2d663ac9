"""PostgresTelemetryBackend against a real PostgreSQL (EMPATHY_TEST_POSTGRES_DSN)."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from empathy_models_postgres import TELEMETRY_SCHEMA_VERSION, PostgresTelemetryBackend

from empathy_models import cache_from_url, quota_store_from_url, state_store_from_url
from empathy_models.backends import MemoryTelemetryBackend, redact_url, telemetry_from_url
from empathy_models.backends._spool import Spool
from empathy_models.backends.batching import BatchingTelemetryBackend
from empathy_models.evidence import rollup
from empathy_models.exceptions import (
    ConfigurationError,
    SchemaVersionError,
    TelemetryError,
    TelemetryRejectedError,
)
from empathy_models.records import LLMCallRecord, ModelPerformance, ModelTier, Outcome
from empathy_models.testing.contracts import assert_same_buckets

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def random_records(seed: int, n: int) -> list[LLMCallRecord]:
    rng = random.Random(seed)
    return [
        LLMCallRecord(
            provider=rng.choice(["anthropic", "openai"]),
            model=rng.choice(["m-small", "m-large", "Z-model", "ä-model"]),
            outcome=rng.choice(list(Outcome)),
            timestamp=T0 + timedelta(seconds=rng.randint(0, 3600), microseconds=i),
            workflow=rng.choice([None, "docs", "code"]),
            stage=rng.choice([None, "outline", "draft"]),
            tier=rng.choice([None, *ModelTier]),
            input_tokens=rng.randint(0, 5000),
            output_tokens=rng.randint(0, 2000),
            cost_usd=rng.choice([0.0, rng.uniform(0, 0.2)]),
            latency_ms=rng.choice([rng.uniform(5, 5000), float(rng.randint(1, 40))]),
            metadata={"i": i, "note": rng.choice(["x", None, 1.5, True])},
        )
        for i in range(n)
    ]


def long_text(seed: int, n: int = 3_000) -> str:
    """``n`` random CJK characters (3 bytes each in UTF-8): long, and not compressible."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(n))


async def execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _five(**fields: Any) -> list[LLMCallRecord]:
    """Five successes of one model, ``c0`` to ``c4`` a second apart from `T0`."""
    return [
        LLMCallRecord(
            provider="openai",
            model="gpt-4o-mini",
            outcome=Outcome.SUCCESS,
            call_id=f"c{i}",
            timestamp=T0 + timedelta(seconds=i),
            **fields,
        )
        for i in range(5)
    ]


def assert_same_performance(got: list[ModelPerformance], want: list[ModelPerformance]) -> None:
    assert [(p.workflow, p.stage, p.model) for p in got] == [
        (p.workflow, p.stage, p.model) for p in want
    ]
    for g, w in zip(got, want, strict=True):
        assert (g.sample_size, g.successes) == (w.sample_size, w.successes)
        # nearest-rank percentiles pick an observed value: exactly equal
        assert (g.latency_p50_ms, g.latency_p95_ms) == (w.latency_p50_ms, w.latency_p95_ms)
        assert (g.first_seen, g.last_seen, g.provider, g.tier) == (
            w.first_seen,
            w.last_seen,
            w.provider,
            w.tier,
        )
        for name in ("avg_latency_ms", "avg_cost_usd", "avg_input_tokens", "avg_output_tokens"):
            gv, wv = getattr(g, name), getattr(w, name)
            assert (gv is None) == (wv is None), name
            if gv is not None:
                assert gv == pytest.approx(wv, rel=1e-12, abs=1e-12), name


async def test_url_factory_gives_a_persistent_batched_backend(postgres_url: str) -> None:
    backend = telemetry_from_url(postgres_url)
    assert isinstance(backend, BatchingTelemetryBackend)
    assert isinstance(backend.inner, PostgresTelemetryBackend)
    assert backend.persistent
    async with backend:
        assert await backend.recent() == []


async def test_batching_a_url_wraps_the_store_once(postgres_url: str) -> None:
    # the URL's backend comes batched already: one queue and one spool, not two
    backend = BatchingTelemetryBackend(postgres_url, max_batch=7)
    assert isinstance(backend.inner, PostgresTelemetryBackend)
    async with backend:
        await backend.record_many(random_records(12, 20))
        assert len(await backend.recent(limit=100)) == 20
        assert backend.written == 20


async def test_url_factory_can_write_directly(postgres_url: str) -> None:
    backend = telemetry_from_url(postgres_url, batch=False)
    assert isinstance(backend, PostgresTelemetryBackend)
    async with backend:
        assert await backend.recent() == []


async def test_url_factory_gives_the_batching_options_to_the_batching(
    postgres_url: str,
) -> None:
    backend = telemetry_from_url(
        postgres_url, max_queue=10, flush_interval=0.5, on_full="drop", batch_size=64
    )
    assert isinstance(backend, BatchingTelemetryBackend)
    assert isinstance(backend.inner, PostgresTelemetryBackend)
    assert backend.inner.batch_size == 64
    assert "flush_interval=0.5, max_queue=10, on_full='drop'" in repr(backend)
    async with backend:
        await backend.record_many(random_records(13, 5))
        assert len(await backend.recent()) == 5
    # a bad value is refused as the batching refuses it, before anything opens
    with pytest.raises(ConfigurationError, match="max_queue"):
        telemetry_from_url(postgres_url, max_queue=0)
    with pytest.raises(ConfigurationError, match=r"\['flush_interval', 'max_queue'\].*batch=False"):
        telemetry_from_url(postgres_url, batch=False, max_queue=10, flush_interval=1.0)
    with pytest.raises(ConfigurationError, match="batch must be True or False"):
        telemetry_from_url(postgres_url, batch="no")


async def test_the_batching_options_in_the_url_query_go_to_the_batching(
    postgres_url: str, with_query: Callable[..., str]
) -> None:
    """As a ``sqlite://`` URL's: ``empathy.toml`` can give them only in the URL."""
    url = with_query(postgres_url, max_queue="10", flush_interval="0.5", on_full="drop")
    backend = telemetry_from_url(url)
    assert isinstance(backend, BatchingTelemetryBackend)
    assert "flush_interval=0.5, max_queue=10, on_full='drop'" in repr(backend)
    async with backend:  # the options are not sent to the server as its settings
        await backend.record_many(random_records(14, 5))
        assert len(await backend.recent()) == 5
    # a keyword argument wins over the query
    assert "max_queue=20" in repr(telemetry_from_url(url, max_queue=20))
    direct = telemetry_from_url(with_query(postgres_url, batch="false"))
    assert isinstance(direct, PostgresTelemetryBackend)
    async with direct:  # reads what the batched backend wrote to the same tables
        assert len(await direct.recent()) == 5
    with pytest.raises(ConfigurationError, match=r"max_queue='ten'.*an integer"):
        telemetry_from_url(with_query(postgres_url, max_queue="ten"))
    with pytest.raises(ConfigurationError, match=r"batch='maybe'.*true or false"):
        telemetry_from_url(with_query(postgres_url, batch="maybe"))
    with pytest.raises(ConfigurationError, match=r"\['max_queue'\].*batch=False"):
        telemetry_from_url(with_query(postgres_url, batch="false", max_queue="10"))


@pytest.mark.parametrize(
    "factory", [telemetry_from_url, state_store_from_url, quota_store_from_url, cache_from_url]
)
def test_an_unknown_option_is_refused_at_construction(factory: Callable[..., Any]) -> None:
    # no server needed: nothing connects before the first operation
    dsn = "postgresql://app:s3cret-pw@127.0.0.1:1/test"
    with pytest.raises(
        ConfigurationError, match=r"unknown options \['max_queu', 'sizes'\]"
    ) as info:
        factory(dsn, max_queu=10, sizes=2, max_size=3)
    assert "s3cret-pw" not in str(info.value)
    # asyncpg's own options, the pool's and the connections', are taken
    factory(dsn, max_size=3, command_timeout=5.0, server_settings={"search_path": "x"})


async def test_records_round_trip_and_recent_is_newest_first(postgres_url: str) -> None:
    records = random_records(1, 300)
    async with PostgresTelemetryBackend(postgres_url, batch_size=64) as backend:
        await backend.record_many(records)
        await backend.record(records[0])  # written twice: stored once (idempotent by call_id)
        got = await backend.recent(limit=1000)
        assert len(got) == 300
        want = sorted(
            [(r.timestamp, i, r) for i, r in enumerate(records)],
            key=lambda t: (t[0], t[1]),
            reverse=True,
        )
        assert got == [r for _, _, r in want]
        only = await backend.recent(limit=5, workflow="docs", stage="draft", model="m-small")
        assert all((r.workflow, r.stage, r.model) == ("docs", "draft", "m-small") for r in only)
        since = T0 + timedelta(minutes=30)
        assert all(r.timestamp >= since for r in await backend.recent(since=since))


async def test_a_tier_this_version_does_not_know_is_read_as_unknown(
    postgres_url: str, postgres_dsn: str
) -> None:
    # written by a newer version or edited by hand: the rest of the store stays readable
    records = _five(tier=ModelTier.CHEAP, workflow="wf", stage="st")
    async with PostgresTelemetryBackend(postgres_url) as backend:
        await backend.record_many(records)
        await execute(
            postgres_dsn,
            f"UPDATE {backend._calls} SET tier = 'ultra', "
            "record = jsonb_set(record, '{tier}', '\"ultra\"') WHERE call_id IN ('c2', 'c4')",
        )
        tiers = {r.call_id: r.tier for r in await backend.recent()}
        (performance,) = await backend.aggregate()
    assert tiers == {
        "c0": ModelTier.CHEAP,
        "c1": ModelTier.CHEAP,
        "c2": None,
        "c3": ModelTier.CHEAP,
        "c4": None,
    }
    assert (performance.tier, performance.sample_size) == (None, 5)  # the newest's tier


async def test_an_outcome_or_circuit_state_this_version_does_not_know_does_not_stop_a_read(
    postgres_url: str, postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # written by a newer version or edited by hand: the row with the unknown outcome is
    # left out (with one warning naming the store), an unknown circuit state reads as unknown
    records = _five()
    async with PostgresTelemetryBackend(postgres_url) as backend:
        await backend.record_many(records)
        await execute(
            postgres_dsn,
            f"UPDATE {backend._calls} SET outcome = 'deferred', "
            "record = jsonb_set(record, '{outcome}', '\"deferred\"') WHERE call_id = 'c2'",
        )
        await execute(
            postgres_dsn,
            f"UPDATE {backend._calls} SET "
            "record = jsonb_set(record, '{circuit_state}', '\"quarantined\"') "
            "WHERE call_id = 'c4'",
        )
        got = {r.call_id: r for r in await backend.recent()}
        (performance,) = await backend.aggregate()
    assert sorted(got) == ["c0", "c1", "c3", "c4"]
    assert (got["c4"].circuit_state, got["c4"].outcome) == (None, Outcome.SUCCESS)
    warned = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warned) == 1 and "PostgreSQL telemetry" in warned[0]
    assert performance.sample_size == 4


@pytest.mark.parametrize("per_stage", [True, False])
async def test_aggregate_matches_the_in_memory_semantics(
    postgres_url: str, per_stage: bool
) -> None:
    records = random_records(2, 800)
    memory = MemoryTelemetryBackend()
    await memory.record_many(records)
    async with PostgresTelemetryBackend(postgres_url) as backend:
        await backend.record_many(records)
        for workflow, stage, since, until in [
            (None, None, None, None),
            ("docs", None, None, None),
            ("code", "outline", None, None),
            (None, None, T0 + timedelta(minutes=10), T0 + timedelta(minutes=40)),
        ]:
            got = await backend.aggregate(
                workflow=workflow, stage=stage, since=since, until=until, per_stage=per_stage
            )
            want = await memory.aggregate(
                workflow=workflow, stage=stage, since=since, until=until, per_stage=per_stage
            )
            assert got, "the query must match something"
            assert_same_performance(got, want)


async def test_a_failing_batch_stores_nothing(postgres_url: str) -> None:
    good = random_records(3, 10)
    # PostgreSQL text cannot hold NUL: this record makes the INSERT fail
    bad = LLMCallRecord(provider="p", model="m\x00", outcome="success", timestamp=T0)
    async with PostgresTelemetryBackend(postgres_url) as backend:
        with pytest.raises(TelemetryRejectedError) as info:
            await backend.record_many([*good, bad])
        assert "a record holds a value that cannot be stored" in str(info.value)
        assert await backend.recent() == []
        await backend.record_many(good)
        assert len(await backend.recent()) == 10


async def test_purge_deletes_only_older_records(postgres_url: str) -> None:
    records = random_records(4, 200)
    cutoff = T0 + timedelta(minutes=20)
    async with PostgresTelemetryBackend(postgres_url) as backend:
        await backend.record_many(records)
        deleted = await backend.purge(before=cutoff)
        assert deleted == sum(r.timestamp < cutoff for r in records)
        kept = await backend.recent(limit=1000)
        assert len(kept) == 200 - deleted
        assert all(r.timestamp >= cutoff for r in kept)
        assert await backend.purge(before=cutoff) == 0


async def test_purges_at_once_take_turns_without_waiting_for_each_other(
    postgres_url: str, postgres_dsn: str
) -> None:
    # a purge (retention, often a job on every worker at once) waited for the rows
    # another purge had deleted but not committed, up to command_timeout, and two over
    # a large table (PostgreSQL starts a second scan where the first one is) could
    # deadlock. Each now deletes what no other session holds, and counts that.
    records = random_records(4, 50)
    cutoff = T0 + timedelta(minutes=20)
    old = sum(r.timestamp < cutoff for r in records)
    async with PostgresTelemetryBackend(postgres_url, command_timeout=1.0) as backend:
        await backend.record_many(records)
        other = await asyncpg.connect(postgres_dsn)
        try:
            async with other.transaction():  # another process's purge, under way
                await other.execute(
                    f"SELECT 1 FROM {backend._calls} WHERE ts < $1 LIMIT 1 FOR UPDATE", cutoff
                )
                await other.execute(
                    f"SELECT 1 FROM {backend._evidence_table} ORDER BY bucket_start "
                    "LIMIT 1 FOR UPDATE"
                )
                # while the rows stay held: a purge waiting for them would fail at
                # command_timeout, as would the wait for the other purge's commit
                assert await backend.purge(before=cutoff) == old - 1
        finally:
            await other.close()
        assert await backend.purge(before=cutoff) == 1  # the one held meanwhile
        kept = await backend.recent(limit=1000)
        assert sorted(r.call_id for r in kept) == sorted(
            r.call_id for r in records if r.timestamp >= cutoff
        )
        evidence = await backend.evidence()
        ended = [b for b in evidence.buckets if b.bucket_start + timedelta(minutes=1) <= cutoff]
        assert ended == []


async def test_version_1_tables_gain_evidence_built_from_their_calls(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    # with the calendar's first and last microseconds, which asyncpg stores as -infinity
    # and infinity
    ends = [
        LLMCallRecord(provider="p", model="m-end", outcome=Outcome.SUCCESS, timestamp=ts)
        for ts in (
            datetime(1, 1, 1, tzinfo=UTC),
            datetime(1, 1, 1, 0, 0, 59, 999999, tzinfo=UTC),
            datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        )
    ]
    # and two costs of $1.7e308 in one arm and minute, whose sum must not overflow
    huge = [
        LLMCallRecord(
            provider="p", model="m-huge", outcome="success", timestamp=T0, cost_usd=1.7e308
        )
        for _ in range(2)
    ]
    records = random_records(5, 600) + ends + huge
    async with PostgresTelemetryBackend(postgres_url) as backend:
        await backend.record_many(records)
    # take the tables back to what version 1 created: the calls table only
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(
            f'DROP TABLE "{postgres_schema}".empathy_evidence, '
            f'"{postgres_schema}".empathy_evidence_version; '
            f'UPDATE "{postgres_schema}".empathy_schema_version SET version = 1'
        )
    finally:
        await conn.close()
    async with PostgresTelemetryBackend(postgres_url) as backend:
        migrated = await backend.evidence()
        assert_same_buckets(migrated.buckets, rollup(records), "evidence after migration")
        more = random_records(6, 40)
        await backend.record_many(more)
        newer = await backend.evidence(after_version=migrated.version)
        assert {b.key for b in newer.buckets} == {b.key for b in rollup(more)}
    assert TELEMETRY_SCHEMA_VERSION == 4


async def test_incremental_evidence_reads_the_version_index(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    async with PostgresTelemetryBackend(postgres_url) as backend:
        for seed in range(20):
            await backend.record_many(random_records(seed, 200))
        await backend.record_many(random_records(99, 5))  # a refresh's worth of news
        last = (await backend.evidence()).version
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f'ANALYZE "{postgres_schema}".empathy_evidence')
        plan = await conn.fetchval(
            f'EXPLAIN SELECT * FROM "{postgres_schema}".empathy_evidence WHERE version > $1',
            last - 1,
        )
    finally:
        await conn.close()
    assert "empathy_evidence_by_version" in plan, plan


async def test_tables_from_a_newer_version_are_refused(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    async with PostgresTelemetryBackend(postgres_url) as backend:
        await backend.record_many(random_records(5, 3))
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(
            f'UPDATE "{postgres_schema}".empathy_schema_version SET version = $1 '
            "WHERE component = 'telemetry'",
            TELEMETRY_SCHEMA_VERSION + 1,
        )
    finally:
        await conn.close()
    backend = PostgresTelemetryBackend(postgres_url)
    with pytest.raises(SchemaVersionError, match="newer than this code"):
        await backend.recent()
    await backend.aclose()


async def test_table_prefixes_keep_backends_apart(
    postgres_url: str, with_query: Callable[..., str]
) -> None:
    a = PostgresTelemetryBackend(with_query(postgres_url, table_prefix="a_"))
    b = PostgresTelemetryBackend(postgres_url, table_prefix="b_")
    async with a, b:
        await a.record_many(random_records(6, 4))
        assert len(await a.recent()) == 4
        assert await b.recent() == []


async def test_errors_name_the_server_without_the_password(postgres_dsn: str) -> None:
    # nothing listens on port 1: the connection is refused
    backend = PostgresTelemetryBackend("postgresql://app:s3cret-pw@127.0.0.1:1/test", timeout=2.0)
    with pytest.raises(TelemetryError) as info:
        await backend.record_many(random_records(7, 1))
    text = f"{info.value} {info.value.target} {backend!r}"
    assert "s3cret-pw" not in text
    assert "127.0.0.1:1" in text
    await backend.aclose()
    assert "s3cret-pw" not in repr(backend)


async def test_a_record_past_a_server_limit_is_given_up_and_holds_up_no_other(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    # an index an operator added on a text that a record may make long: the server
    # refuses that record for its size (ProgramLimitExceededError), a property of the
    # record, not an outage; it is given up and counted, the others are stored
    async with BatchingTelemetryBackend(PostgresTelemetryBackend(postgres_url)) as backend:
        assert await backend.recent() == []  # the tables exist
        await execute(
            postgres_dsn,
            f"CREATE INDEX ON \"{postgres_schema}\".empathy_calls ((record->>'error_message'))",
        )
        good = random_records(7, 6)
        refused = LLMCallRecord(
            provider="p", model="m", outcome="failure", timestamp=T0, error_message=long_text(1)
        )
        await backend.record_many([*good[:3], refused, *good[3:]])
        await backend.flush()
        assert (backend.written, backend.failed, backend.pending) == (6, 1, 0)
        later = random_records(8, 4)
        await backend.record_many(later)
        await backend.flush()
        stored = {r.call_id for r in await backend.recent(limit=100)}
        assert stored == {r.call_id for r in [*good, *later]}


async def test_a_spool_with_long_names_and_a_refused_record_is_replayed_to_the_end(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    # what a process that could not store them left in the spool: records with long
    # names and one the server refuses (an operator's index, as above); the next
    # process stores each record it can, gives the refused one up and goes on
    async with PostgresTelemetryBackend(postgres_url) as inner:
        assert await inner.recent() == []
        target = inner.spool_target
    await execute(
        postgres_dsn,
        f"CREATE INDEX ON \"{postgres_schema}\".empathy_calls ((record->>'error_message'))",
    )
    long_names = LLMCallRecord(
        provider="p",
        model=long_text(2),
        outcome="success",
        timestamp=T0,
        workflow=long_text(3),
        stage=long_text(4),
    )
    refused = LLMCallRecord(
        provider="p", model="m", outcome="failure", timestamp=T0, error_message=long_text(5)
    )
    good = random_records(9, 4)
    spool = Spool(target)
    spool.write([good[0], long_names, refused, *good[1:]])
    async with BatchingTelemetryBackend(PostgresTelemetryBackend(postgres_url)) as backend:
        own = random_records(10, 3)
        await backend.record_many(own)
        with anyio.fail_after(20):
            while spool.files() or backend.pending:
                await backend.flush()
        assert backend.failed == 1
        stored = {r.call_id for r in await backend.recent(limit=100)}
        assert stored == {r.call_id for r in [*good, long_names, *own]}


async def test_version_3_tables_take_long_names_once_migrated(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    first = random_records(11, 50)
    async with PostgresTelemetryBackend(postgres_url) as backend:
        await backend.record_many(first)
    # take the indexes back to what version 3 created: on whole names
    s = f'"{postgres_schema}"'
    await execute(
        postgres_dsn,
        f"DROP INDEX {s}.empathy_calls_by_arm, {s}.empathy_calls_call_id, "
        f"{s}.empathy_evidence_key; "
        f"CREATE INDEX empathy_calls_aggregate ON {s}.empathy_calls (workflow, stage, ts)"
        " INCLUDE (model, outcome, latency_ms, cost_usd, input_tokens, output_tokens,"
        " provider, tier, seq); "
        f"CREATE UNIQUE INDEX empathy_calls_call_id ON {s}.empathy_calls (call_id); "
        f"CREATE UNIQUE INDEX empathy_evidence_key ON {s}.empathy_evidence (bucket_start,"
        " (workflow IS NULL), coalesce(workflow, ''), (stage IS NULL), coalesce(stage, ''),"
        " model); "
        f"UPDATE {s}.empathy_schema_version SET version = 3 WHERE component = 'telemetry'",
    )
    long_names = LLMCallRecord(
        provider=long_text(6),
        model=long_text(7),
        outcome="success",
        timestamp=first[0].timestamp,
        workflow=first[0].workflow,
        stage=long_text(8),
        call_id=long_text(9),
    )
    async with PostgresTelemetryBackend(postgres_url) as backend:
        # the first ten again (stored once), then the long names, twice
        await backend.record_many([*first[:10], long_names, long_names])
        assert len(await backend.recent(limit=1000)) == 51
        buckets = (await backend.evidence()).buckets
        assert_same_buckets(buckets, rollup([*first, long_names]), "after the migration")
        found = await backend.recent(stage=long_names.stage)
        assert [r.call_id for r in found] == [long_names.call_id]


async def test_read_only_a_schema_without_calls_reads_as_empty(postgres_url: str) -> None:
    # breakers, but never telemetry, in the schema: a read-only backend reads no calls,
    # as a SQLite file does, rather than saying the schema holds no empathy-models tables
    async with state_store_from_url(postgres_url) as store:
        await store.reset("k")
    async with PostgresTelemetryBackend(postgres_url, create=False) as backend:
        assert await backend.aggregate() == []
        assert await backend.recent() == []
        assert await backend.spend() == {}
        assert len(await backend.evidence()) == 0
        assert await backend.purge(before=T0) == 0
        # and once calls are recorded, a backend open for long reads them
        async with PostgresTelemetryBackend(postgres_url) as writer:
            await writer.record_many(random_records(13, 5))
        assert len(await backend.recent()) == 5
        assert len(await backend.evidence()) > 0


async def test_a_migration_longer_than_the_open_goes_on_instead_of_starting_over(
    postgres_url: str, postgres_dsn: str, postgres_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # an upgrade over a large table, here a migration held up by a reader of the calls:
    # the open's 2 s bound cut it short, rolled it back and said "no answer", and the
    # first operation ran it again from the start
    s = f'"{postgres_schema}"'
    async with PostgresTelemetryBackend(postgres_url) as backend:
        await backend.record_many(random_records(12, 20))
    await execute(postgres_dsn, f"UPDATE {s}.empathy_schema_version SET version = 3")
    version = f"SELECT version FROM {s}.empathy_schema_version WHERE component = 'telemetry'"
    reader = await asyncpg.connect(postgres_dsn)
    backend = PostgresTelemetryBackend(postgres_url)
    try:
        async with reader.transaction():
            # the migration's DROP INDEX waits for the reader's transaction
            await reader.fetchval(f"SELECT count(*) FROM {s}.empathy_calls")
            await backend.__aenter__()
        # the reader is done: the migration ends without any operation asking for it
        # (its advisory lock, held to its commit, is waited for)
        with anyio.fail_after(20):
            async with reader.transaction():
                await reader.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1))",
                    f"empathy_models:{postgres_schema}:empathy_",
                )
                assert await reader.fetchval(version) == TELEMETRY_SCHEMA_VERSION
        assert len(await backend.recent(limit=100)) == 20
    finally:
        await backend.aclose()
        await reader.close()
    said = [r.getMessage() for r in caplog.records if r.name.endswith("postgres")]
    assert not [m for m in said if "no answer" in m], said
    assert [m for m in said if "migrating" in m], said


# ------------------------------------------- each store's spool its own


async def test_stores_told_apart_by_their_connection_options_keep_spools_of_their_own(
    postgres_dsn: str, postgres_schema: str
) -> None:
    # the spool was named by the DSN shown alone: two stores told apart by a connection
    # option (here the search_path that picks their tables) shared one, and the records
    # one left in it were replayed into the other
    other = f"{postgres_schema}_b"
    await execute(postgres_dsn, f'CREATE SCHEMA "{postgres_schema}"; CREATE SCHEMA "{other}"')

    def store(schema: str) -> PostgresTelemetryBackend:
        return PostgresTelemetryBackend(postgres_dsn, server_settings={"search_path": schema})

    try:
        left = random_records(21, 3)
        Spool(store(postgres_schema).spool_target).write(left)  # as an outage left them
        async with BatchingTelemetryBackend(store(other)) as telemetry:
            await telemetry.flush()
            assert await telemetry.recent(limit=100) == []
        async with BatchingTelemetryBackend(store(postgres_schema)) as telemetry:
            await telemetry.flush()
            stored = await telemetry.recent(limit=100)
        assert sorted(r.call_id for r in stored) == sorted(r.call_id for r in left)
    finally:
        await execute(postgres_dsn, f'DROP SCHEMA IF EXISTS "{other}" CASCADE')


async def test_a_spool_named_as_earlier_versions_named_it_is_replayed(
    postgres_dsn: str, postgres_schema: str, empathy_home: Path
) -> None:
    await execute(postgres_dsn, f'CREATE SCHEMA "{postgres_schema}"')
    inner = PostgresTelemetryBackend(postgres_dsn, server_settings={"search_path": postgres_schema})
    (former,) = inner.former_spool_targets
    assert former == f"postgresql:{redact_url(postgres_dsn)}:schema=None:prefix=empathy_"
    left = random_records(22, 3)
    Spool(former).write(left)
    async with BatchingTelemetryBackend(inner) as telemetry:
        await telemetry.flush()
        stored = await telemetry.recent(limit=100)
    assert sorted(r.call_id for r in stored) == sorted(r.call_id for r in left)
    assert list((empathy_home / "spool").iterdir()) == []  # the former directory removed


def test_a_spool_is_named_by_what_picks_the_database_and_never_by_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def target(dsn: str, **options: Any) -> str:
        return PostgresTelemetryBackend(dsn, **options).spool_target

    monkeypatch.delenv("PGDATABASE", raising=False)
    bare = target("postgresql://app:s3cret@db.internal")
    monkeypatch.setenv("PGDATABASE", "orders")
    orders = target("postgresql://app:s3cret@db.internal")
    monkeypatch.setenv("PGDATABASE", "billing")
    billing = target("postgresql://app:s3cret@db.internal")
    assert len({bare, orders, billing}) == 3  # the database asyncpg takes from PGDATABASE
    # a database the DSN names itself is not PGDATABASE's, nor the password part of it
    assert target("postgresql://app:s3cret@db.internal/x") == target(
        "postgresql://app:rotated@db.internal/x"
    )
    assert target("postgresql://app:s3cret@db.internal/x") == (
        "postgresql:postgresql://app:***@db.internal/x:schema=None:prefix=empathy_"
    )
    told = {
        target("postgresql://app:s3cret@db.internal/x", database="y"),
        target("postgresql://app:s3cret@db.internal/x", host="other"),
        target("postgresql://app:s3cret@db.internal/x", user="ops"),
        target("postgresql://app:s3cret@db.internal/x"),
    }
    assert len(told) == 4
    assert not [t for t in [bare, orders, billing, *told] if "s3cret" in t or "rotated" in t]
