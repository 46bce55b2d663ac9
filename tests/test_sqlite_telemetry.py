"""SQLiteTelemetryBackend: the contract suite (file, unbatched file, :memory:) plus specifics."""

from __future__ import annotations

import math
import os
import random
import re
import sqlite3
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    BackendError,
    ConfigurationError,
    LLMCallRecord,
    ModelTier,
    Outcome,
    state_store_from_url,
)
from empathy_models._stats import aggregate_records, matches
from empathy_models.backends import telemetry_from_url
from empathy_models.backends.sqlite import SCHEMA_VERSION, SQLiteTelemetryBackend
from empathy_models.evidence import rollup
from empathy_models.exceptions import (
    RecordValidationError,
    SchemaVersionError,
    TelemetryError,
    TelemetryRejectedError,
)
from empathy_models.records import ModelPerformance
from empathy_models.testing.contracts import TelemetryBackendContract, assert_same_buckets


class TestSQLiteFileTelemetry(TelemetryBackendContract):
    @pytest.fixture
    def telemetry_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/calls.db"


class TestSQLiteFileTelemetryUnbatched(TelemetryBackendContract):
    @pytest.fixture
    def telemetry_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/calls.db?batch=false"


class TestSQLiteMemoryTelemetry(TelemetryBackendContract):
    @pytest.fixture
    def telemetry_url(self) -> str:
        return "sqlite://:memory:"


# --------------------------------------------------------------------------- specifics

BASE = datetime(2026, 3, 1, tzinfo=UTC)


def _records(n: int, *, seed: int = 1, prefix: str = "c") -> list[LLMCallRecord]:
    """Varied records: every outcome, ties in time and latency, None and '' groups."""
    rng = random.Random(seed)
    out: list[LLMCallRecord] = []
    for i in range(n):
        ts = (
            rng.choice(out).timestamp
            if out and rng.random() < 0.1
            else BASE + timedelta(seconds=rng.randrange(86_400), microseconds=rng.randrange(10**6))
        )
        out.append(
            LLMCallRecord(
                provider=rng.choice(["p1", "p2"]),
                model=rng.choice(["m1", "m2", "m3"]),
                outcome=rng.choice(list(Outcome)),
                call_id=f"{prefix}{i:05d}",
                timestamp=ts,
                workflow=rng.choice([None, "", "wf"]),
                stage=rng.choice([None, "s1", "s2"]),
                tier=rng.choice([None, "cheap", "premium"]),
                latency_ms=rng.choice([5.0, 10.0, rng.uniform(0, 3000)]),
                cost_usd=rng.uniform(0, 0.02),
                input_tokens=rng.randrange(5000),
                output_tokens=rng.randrange(800),
            )
        )
    return out


def _modes(directory: Path, prefix: str) -> dict[str, int]:
    return {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in directory.iterdir()
        if p.name.startswith(prefix)
    }


def _rows(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        count: int = conn.execute("SELECT COUNT(*) FROM llm_calls").fetchone()[0]
        return count
    finally:
        conn.close()


AVERAGE_REL_TOL = 1e-9  # the agreement `TelemetryBackend.aggregate` promises on ``avg_*``


def _same_performance(got: ModelPerformance, want: ModelPerformance) -> bool:
    """Every field equal, except the averages: equal to `AVERAGE_REL_TOL` (relative)."""
    got_fields, want_fields = attrs.asdict(got, recurse=False), attrs.asdict(want, recurse=False)
    for name, expected in want_fields.items():
        actual = got_fields[name]
        if name.startswith("avg_") and actual is not None and expected is not None:
            if not math.isclose(actual, expected, rel_tol=AVERAGE_REL_TOL, abs_tol=0.0):
                return False
        elif actual != expected:
            return False
    return True


def test_the_average_tolerance_is_relative_and_nothing_else_is_tolerated() -> None:
    base = ModelPerformance(model="m", sample_size=3, successes=2, avg_cost_usd=0.01)
    assert _same_performance(attrs.evolve(base, avg_cost_usd=0.01 * (1 + 1e-12)), base)
    assert not _same_performance(attrs.evolve(base, avg_cost_usd=0.01 * (1 + 1e-8)), base)
    assert not _same_performance(attrs.evolve(base, avg_cost_usd=0.0), base)
    assert not _same_performance(attrs.evolve(base, successes=1), base)


async def test_aggregate_equals_the_in_memory_reference(tmp_path: Path) -> None:
    """Both compute each average with sums in their own order: equal to a relative 1e-9."""
    records = _records(1500)
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as sqlite_backend:
        await sqlite_backend.record_many(records)
        since = BASE + timedelta(hours=3)
        until = BASE + timedelta(hours=20)
        for per_stage in (True, False):
            queries: list[dict[str, Any]] = [
                {},
                {"workflow": "wf"},
                {"workflow": ""},
                {"stage": "s1"},
            ]
            windows: list[dict[str, Any]] = [{}, {"since": since, "until": until}]
            for query in queries:
                for window in windows:
                    got = await sqlite_backend.aggregate(per_stage=per_stage, **query, **window)
                    rows = [
                        r
                        for r in records
                        if matches(
                            r,
                            workflow=query.get("workflow"),
                            stage=query.get("stage"),
                            since=window.get("since"),
                            until=window.get("until"),
                        )
                    ]
                    want = aggregate_records(rows, per_stage=per_stage)
                    assert len(got) == len(want), (per_stage, query, window)
                    for g, w in zip(got, want, strict=True):
                        assert _same_performance(g, w), (per_stage, query, window, g, w)


async def test_the_router_query_reads_only_the_covering_index(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db) as backend:
        await backend.record_many(_records(50))
        await backend.flush()
    from empathy_models.backends.sqlite._schema import (
        _aggregate_sql,  # the query as the backend runs it
    )

    sql = _aggregate_sql(" AND workflow = :workflow AND stage = :stage AND ts_us >= :since", True)
    conn = sqlite3.connect(db)
    try:
        plan = conn.execute(
            f"EXPLAIN QUERY PLAN {sql}",
            {"workflow": "wf", "stage": "s1", "since": 0, "p50": 0.5, "p95": 0.95},
        ).fetchall()
    finally:
        conn.close()
    details = [row[-1] for row in plan]
    assert any("COVERING INDEX ix_llm_calls_route" in d for d in details), details
    assert not any(d.startswith("SCAN llm_calls") for d in details), details


async def test_records_are_queued_and_written_on_flush(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    backend = telemetry_from_url(f"sqlite:///{db}?flush_interval=3600&max_batch=100000")
    assert isinstance(backend, SQLiteTelemetryBackend)
    async with backend:
        for r in _records(300):
            await backend.record(r)
        assert backend.pending == 300
        assert _rows(db) == 0, "record() must not wait for the disk"
        await backend.flush()
        assert (backend.pending, _rows(db)) == (0, 300)


async def test_a_full_batch_is_written_without_a_flush(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db, max_batch=10, flush_interval=3600) as backend:
        for r in _records(25):
            await backend.record(r)
        # a full batch wakes the flusher at once (the interval is an hour); it then
        # drains everything queued, in batches of at most max_batch
        with anyio.fail_after(10):
            while _rows(db) < 25:  # noqa: ASYNC110 - the rows are in another connection
                await anyio.sleep(0.01)
        assert backend.pending == 0


async def test_a_clean_close_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    # close_timeout: the close is given all the time it needs (a loaded machine wrote
    # 4,608 of the 5,000 within the default 5 s and spooled the rest, as documented)
    backend = SQLiteTelemetryBackend(db, max_batch=64, max_queue=256, close_timeout=120)
    records = _records(5000, seed=3)
    for r in records:
        await backend.record(r)
    await backend.aclose()
    assert _rows(db) == 5000
    async with SQLiteTelemetryBackend(db) as reopened:
        got = await reopened.recent(limit=10_000)
    assert sorted(r.call_id for r in got) == sorted(r.call_id for r in records)


async def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = telemetry_from_url("sqlite:///relative.db")
    absolute = telemetry_from_url(f"sqlite:///{tmp_path}/sub/../absolute.db")
    memory = telemetry_from_url("sqlite://:memory:")
    memory3 = telemetry_from_url("sqlite:///:memory:")
    assert isinstance(relative, SQLiteTelemetryBackend)
    assert isinstance(absolute, SQLiteTelemetryBackend)
    assert isinstance(memory, SQLiteTelemetryBackend)
    assert isinstance(memory3, SQLiteTelemetryBackend)
    assert relative.path == str(tmp_path / "relative.db")
    assert absolute.path == str(tmp_path / "absolute.db")
    assert memory.path == memory3.path == ":memory:"
    assert relative.persistent and not memory.persistent
    for backend in (relative, absolute, memory, memory3):
        async with backend:
            await backend.record(_records(1)[0])
            assert len(await backend.recent()) == 1
    assert (tmp_path / "relative.db").is_file() and (tmp_path / "absolute.db").is_file()
    unbatched = telemetry_from_url("sqlite://:memory:?batch=false&busy_timeout=1.5")
    assert repr(unbatched) == "SQLiteTelemetryBackend(':memory:', batch=False)"
    await unbatched.aclose()


async def test_a_leading_tilde_is_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as in empathy.toml: "sqlite:///~/calls.db" is the home directory's calls.db, not a
    # directory named "~" under the working directory
    home, work = tmp_path / "home", tmp_path / "work"
    os.mkdir(home)
    os.mkdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    backend = telemetry_from_url("sqlite:///~/calls.db?batch=false")
    assert isinstance(backend, SQLiteTelemetryBackend)
    assert backend.path == str(home / "calls.db")
    async with backend:
        await backend.record(_records(1)[0])
    assert os.listdir(home) == ["calls.db"] and os.listdir(work) == []
    with pytest.raises(ConfigurationError, match="no home directory"):
        telemetry_from_url("sqlite:///~no-such-user-4242/calls.db")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "names no file"),
        ("sqlite:///", "names no file"),
        ("sqlite://host/x.db", "host part"),
        ("sqlite:///x.db?colour=blue", "unknown sqlite URL option 'colour'"),
        ("sqlite:///x.db?batch=maybe", "batch='maybe' must be true or false"),
        ("sqlite:///x.db?max_batch=lots", "max_batch='lots' must be an integer"),
        ("sqlite:///x.db?on_full=explode", "on_full must be 'spill', 'wait' or 'drop'"),
        ("sqlite:///x.db?busy_timeout=-1", "busy_timeout must be"),
    ],
)
def test_bad_urls_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        telemetry_from_url(url)


def test_a_mistyped_option_is_named_with_the_one_meant() -> None:
    with pytest.raises(
        ConfigurationError, match=re.escape("'max_queu' (did you mean 'max_queue'?)")
    ):
        telemetry_from_url("sqlite:///x.db?max_queu=5")
    # a state store's URL given a telemetry option: said so, not guessed at
    with pytest.raises(
        ConfigurationError,
        match=re.escape("'flush_interval' (a telemetry URL's option: this store does not take it)"),
    ):
        state_store_from_url("sqlite:///x.db?flush_interval=1")


async def test_files_are_created_private(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    old = os.umask(0)
    try:
        async with SQLiteTelemetryBackend(db, batch=False) as backend:
            await backend.record(_records(1)[0])
            modes = _modes(tmp_path, "calls.db")
    finally:
        os.umask(old)
    assert set(modes) == {"calls.db", "calls.db-wal", "calls.db-shm"}
    assert modes == dict.fromkeys(modes, 0o600)


def _make_file(path: Path, mode: int) -> None:
    path.touch()
    path.chmod(mode)


@pytest.mark.parametrize("existing", [("calls.db",), ("calls.db", "calls.db-wal", "calls.db-shm")])
async def test_an_existing_database_of_ours_is_made_private(
    tmp_path: Path, existing: tuple[str, ...]
) -> None:
    # an empty 0644 file (as `touch` makes it), and its WAL files left by an earlier run:
    # narrowed once the file is known to be ours, before anything is written to it
    for name in existing:
        _make_file(tmp_path / name, 0o644)
    async with SQLiteTelemetryBackend(tmp_path / "calls.db", batch=False) as backend:
        await backend.record(_records(1)[0])
        modes = _modes(tmp_path, "calls.db")
    assert set(modes) == {"calls.db", "calls.db-wal", "calls.db-shm"}
    assert modes == dict.fromkeys(modes, 0o600)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a file away"
)
async def test_another_users_database_keeps_its_mode(tmp_path: Path) -> None:
    # shared with us on purpose (0666): not ours to narrow
    db = tmp_path / "calls.db"
    _make_file(db, 0o666)
    os.chown(db, 4242, 4242)
    async with SQLiteTelemetryBackend(db, batch=False) as backend:
        await backend.record(_records(1)[0])
        modes = _modes(tmp_path, "calls.db")
    assert modes["calls.db"] == 0o666


async def test_schema_is_versioned_and_a_newer_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db) as backend:
        await backend.record(_records(1)[0])
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    finally:
        conn.close()
    newer = SQLiteTelemetryBackend(db)
    with pytest.raises(SchemaVersionError) as info:
        await newer.record_many([])  # nothing to write: no open either
        await newer.recent()
    await newer.aclose()
    assert str(db) in str(info.value) and info.value.target == str(db)
    assert isinstance(info.value, BackendError)
    assert _rows(db) == 1, "the newer file must be left as it was"


def _version_1_file(db: Path, records: list[LLMCallRecord]) -> None:
    """Write ``db`` as version 1 of the schema wrote it, holding ``records`` (copies too)."""
    from empathy_models.backends.sqlite._schema import _INSERT_CALL, _MIGRATIONS, _to_row

    conn = sqlite3.connect(db)
    try:
        for statement in _MIGRATIONS[0]:  # version 1's tables and indexes
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        # version 1 had no unique call_id to conflict on, nor routing_propensity (v5)
        plain_insert = _INSERT_CALL.removesuffix(" ON CONFLICT (call_id) DO NOTHING")
        plain_insert = plain_insert.replace(", routing_propensity)", ")").replace(", ?)", ")")
        conn.executemany(plain_insert, (_to_row(r)[:-1] for r in records))
        conn.commit()
    finally:
        conn.close()


async def test_a_version_1_file_gains_evidence_built_from_its_calls(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    # with the calendar's first and last microseconds: the SQL buckets them as rollup() does
    records = _records(800) + [
        attrs.evolve(r, timestamp=ts, call_id=f"end{i}", outcome=Outcome.SUCCESS)
        for i, (r, ts) in enumerate(
            zip(
                _records(3, seed=3),
                (
                    datetime(1, 1, 1, tzinfo=UTC),
                    datetime(1, 1, 1, 0, 0, 59, 999999, tzinfo=UTC),
                    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
                ),
                strict=True,
            )
        )
    ]
    _version_1_file(db, records)
    async with SQLiteTelemetryBackend(db) as backend:
        migrated = await backend.evidence()
        assert_same_buckets(migrated.buckets, rollup(records), "evidence after migration")
        more = _records(50, seed=2, prefix="d")
        await backend.record_many(more)
        newer = await backend.evidence(after_version=migrated.version)
        assert {b.key for b in newer.buckets} == {b.key for b in rollup(more)}
        assert_same_buckets(
            (await backend.evidence()).buckets, rollup(records + more), "after new writes"
        )
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    finally:
        conn.close()


async def test_migrating_a_version_1_file_counts_each_cost_for_at_most_1e300(
    tmp_path: Path,
) -> None:
    # the largest valid cost, five times in one minute (and on a call that is no sample):
    # summed as stored they are past any float; each counts for at most 1e300 in a
    # bucket (evidence.py), in the rollups the migration builds as in those a write adds
    db = tmp_path / "v1.db"
    huge = [
        attrs.evolve(
            r,
            call_id=f"huge{i}",
            model="m-huge",
            workflow="wf",
            stage="s1",
            timestamp=BASE + timedelta(seconds=i),
            outcome=[Outcome.SUCCESS, Outcome.FAILURE, Outcome.CANCELLED][i % 3],
            cost_usd=sys.float_info.max,
        )
        for i, r in enumerate(_records(6, seed=5))
    ]
    records = _records(100, seed=6) + huge
    _version_1_file(db, records)
    async with SQLiteTelemetryBackend(db) as backend:
        migrated = await backend.evidence()
        assert_same_buckets(migrated.buckets, rollup(records), "evidence after migration")
        (bucket,) = [b for b in migrated.buckets if b.model == "m-huge"]
        assert bucket.samples == 4 and bucket.cost_usd == pytest.approx(4e300, rel=1e-9)
        await backend.record_many(
            [attrs.evolve(huge[0], call_id="huge-later", timestamp=BASE + timedelta(seconds=30))]
        )
        (bucket,) = [b for b in (await backend.evidence()).buckets if b.model == "m-huge"]
        assert bucket.samples == 5 and bucket.cost_usd == pytest.approx(5e300, rel=1e-9)


async def test_migrating_a_version_1_file_counts_a_copied_call_once_in_the_evidence(
    tmp_path: Path,
) -> None:
    # version 1 had no unique call_id: a replay could store a call twice.  Migrating keeps
    # the first copy (version 3) and the rollups count what is kept (version 2)
    db = tmp_path / "v1.db"
    records = _records(200, seed=9)
    copies = [attrs.evolve(r, cost_usd=r.cost_usd + 1.0) for r in records[::7]]
    _version_1_file(db, records + copies)
    async with SQLiteTelemetryBackend(db) as backend:
        assert len(await backend.recent(limit=1000)) == len(records)
        assert_same_buckets(
            (await backend.evidence()).buckets, rollup(records), "evidence after migration"
        )


async def test_incremental_evidence_reads_the_version_index(tmp_path: Path) -> None:
    from empathy_models.backends.sqlite._schema import _evidence_query

    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db) as backend:
        await backend.record_many(_records(50))
    conn = sqlite3.connect(db)
    try:
        sql, params = _evidence_query(None, None, 7)
        plan = [row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
        assert any("USING INDEX ix_evidence_version (version>?)" in d for d in plan), plan
        # a window (router start) is a range scan too, on one index or the other
        sql, params = _evidence_query(BASE, BASE + timedelta(hours=1), 0)
        plan = [row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
        assert any(d.startswith("SEARCH evidence_buckets USING INDEX") for d in plan), plan
    finally:
        conn.close()


async def _raises_naming_the_path(backend: SQLiteTelemetryBackend, path: Path) -> str:
    try:
        with anyio.fail_after(20):
            with pytest.raises(TelemetryError) as info:
                async with backend:
                    pass
            with pytest.raises(TelemetryError):
                await backend.recent()
    finally:
        await backend.aclose()
    assert str(path) in str(info.value) and info.value.target == str(path)
    assert isinstance(info.value.__cause__, OSError | sqlite3.Error | type(None))
    return str(info.value)


async def test_a_path_in_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "calls.db"
    message = await _raises_naming_the_path(SQLiteTelemetryBackend(path), path)
    assert "does not exist" in message
    assert not (tmp_path / "no").exists()


async def test_a_directory_instead_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    path.mkdir()
    message = await _raises_naming_the_path(SQLiteTelemetryBackend(path), path)
    assert "directory" in message


async def test_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    path.write_bytes(random.Random(5).randbytes(8192))
    message = await _raises_naming_the_path(SQLiteTelemetryBackend(path), path)
    assert "not a SQLite database" in message


async def test_a_read_only_file(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(path) as backend:
        await backend.record(_records(1)[0])
    path.chmod(0o400)
    try:
        message = await _raises_naming_the_path(SQLiteTelemetryBackend(path), path)
    finally:
        path.chmod(0o600)
    assert "read-only" in message
    assert _rows(path) == 1


async def test_a_locked_file_is_waited_for_and_never_reported_as_locked(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    backend = SQLiteTelemetryBackend(db, batch=False, busy_timeout=0.01)
    await backend.record(_records(1)[0])  # created and migrated
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        async with anyio.create_task_group() as tg:
            tg.start_soon(backend.record_many, _records(10, seed=9, prefix="d"))
            with anyio.fail_after(20):
                while backend.busy_retries == 0:  # noqa: ASYNC110 - a counter, no event
                    await anyio.sleep(0.005)
            blocker.execute("COMMIT")
    finally:
        blocker.close()
        await backend.aclose()
    assert _rows(db) == 11


async def test_a_lock_held_too_long_is_a_telemetry_error(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    backend = SQLiteTelemetryBackend(db, batch=False, busy_timeout=0.01, lock_timeout=0.2)
    await backend.record(_records(1)[0])
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(TelemetryError, match="stayed locked") as info:
            await backend.record_many(_records(3))
        assert info.value.target == str(db)
        blocker.execute("ROLLBACK")
        await backend.record_many(_records(3, prefix="d"))  # and it works again once released
    finally:
        blocker.close()
        await backend.aclose()
    assert _rows(db) == 4


def _refuse(db: Path, call_id: str) -> None:
    """Make the file refuse to insert ``call_id`` (a trigger, as another writer could add)."""
    conn = sqlite3.connect(db)
    try:
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT ON llm_calls WHEN NEW.call_id = '{call_id}' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        conn.commit()
    finally:
        conn.close()


async def test_a_failed_batch_stores_none_of_it(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    records = _records(5)
    poison = attrs.evolve(records[3], call_id="poison")
    async with SQLiteTelemetryBackend(db, batch=False) as backend:
        await backend.recent()  # the file exists and has its schema
        _refuse(db, "poison")
        with pytest.raises(TelemetryError):
            await backend.record_many([*records[:3], poison, records[4]])
        assert await backend.recent() == []
        with pytest.raises(RecordValidationError):
            await backend.record_many([records[0], "not a record"])  # type: ignore[list-item]
        assert await backend.recent() == []


async def test_failed_batches_are_counted_and_never_raise_into_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = _records(4)
    bad = attrs.evolve(records[0], call_id="bad")
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db, max_batch=1) as backend:
        await backend.recent()  # the file exists and has its schema
        _refuse(db, "bad")
        await backend.record(bad)
        await backend.record_many(records[1:])
        await backend.flush()
        assert (backend.failed, backend.dropped) == (1, 0)
        assert sorted(r.call_id for r in await backend.recent()) == sorted(
            r.call_id for r in records[1:]
        )
    assert any("refused by the store and given up" in r.getMessage() for r in caplog.records)


async def test_metadata_round_trips_and_what_would_not_is_refused_up_front(
    tmp_path: Path,
) -> None:
    odd = attrs.evolve(_records(1)[0], metadata={"ok": 1, "big": 2**70, "f": 0.5, "n": None})
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        await backend.record(odd)
        (got,) = await backend.recent()
        assert backend.failed == 0
    assert got == odd
    # a datetime would come back as its str(): the record refuses it instead
    with pytest.raises(RecordValidationError, match="metadata"):
        attrs.evolve(odd, metadata={"when": BASE})


async def test_integers_are_held_to_what_sqlite_stores(tmp_path: Path) -> None:
    # An int beyond SQLite's 64 bits failed its whole batch (every good record in it
    # lost); the record now refuses it, and the largest one stored round-trips.
    with pytest.raises(RecordValidationError, match="input_tokens"):
        attrs.evolve(_records(1)[0], input_tokens=2**63)
    with pytest.raises(RecordValidationError, match="attempt"):
        attrs.evolve(_records(1)[0], attempt=2**64)
    big = attrs.evolve(_records(1)[0], input_tokens=2**63 - 1, breaker_generation=2**63 - 1)
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        await backend.record(big)
        (got,) = await backend.recent()
        assert backend.failed == 0
    assert got == big


async def test_a_nan_is_never_stored_where_it_could_not_be_read_back(tmp_path: Path) -> None:
    """A record built without validation (as the executor builds its own) with NaN metadata."""
    from empathy_models.records import _trusted_call_record

    good = _records(3)
    fields = {a.name: getattr(good[0], a.name) for a in attrs.fields(LLMCallRecord)}
    odd = _trusted_call_record(**{**fields, "call_id": "odd", "metadata": {"x": math.nan}})
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        await backend.record_many([good[1], odd, good[2]])
        got = {r.call_id: r for r in await backend.recent()}  # readable: no NaN stored
        assert backend.failed == 0
    assert set(got) == {"odd", good[1].call_id, good[2].call_id}
    assert dict(got["odd"].metadata) == {"x": None, "empathy_models.sanitized": "metadata"}
    with pytest.raises(TelemetryRejectedError, match="cannot be stored"):
        async with SQLiteTelemetryBackend(tmp_path / "direct.db", batch=False) as direct:
            await direct.record(odd)


async def test_inserting_calls_reports_exactly_the_records_it_inserted(tmp_path: Path) -> None:
    """What rollups count: a replayed record (same call_id) is neither stored nor returned."""
    from empathy_models.backends.sqlite._schema import _insert_calls_now

    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db) as backend:
        await backend.recent()  # the file exists with its schema
    records = _records(10)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        assert _insert_calls_now(conn, records[:6]) == records[:6]
        again = [records[2], records[7], records[7], records[5], records[9]]
        assert _insert_calls_now(conn, again) == [records[7], records[9]]
        assert conn.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == 8
    finally:
        conn.close()


def _tiered(n: int) -> list[LLMCallRecord]:
    """``n`` calls of one stage in the last minutes, every third failed, tier cheap."""
    start = datetime.now(UTC) - timedelta(minutes=10)
    return [
        LLMCallRecord(
            provider="openai",
            model="gpt-4o-mini",
            tier=ModelTier.CHEAP,
            outcome=Outcome.FAILURE if i % 3 == 0 else Outcome.SUCCESS,
            workflow="wf",
            stage="st",
            latency_ms=10.0,
            call_id=f"c{i:02d}",
            timestamp=start + timedelta(seconds=i),
        )
        for i in range(n)
    ]


async def test_a_tier_this_version_does_not_know_is_read_as_unknown(tmp_path: Path) -> None:
    # written by a newer version or edited by hand: the rest of the store stays readable
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db) as backend:
        await backend.record_many(_tiered(30))
    conn = sqlite3.connect(db)
    try:
        conn.execute("UPDATE llm_calls SET tier = 'ultra' WHERE call_id IN ('c20', 'c29')")
        conn.commit()
    finally:
        conn.close()
    async with SQLiteTelemetryBackend(db) as backend:
        tiers = {r.call_id: r.tier for r in await backend.recent(limit=30)}
        (performance,) = await backend.aggregate()
    assert (tiers["c20"], tiers["c29"], tiers["c28"]) == (None, None, ModelTier.CHEAP)
    assert (performance.tier, performance.sample_size) == (None, 30)  # the newest's tier
    async with AdaptiveModelRouter(None, f"sqlite:///{db}", refresh_interval=None) as router:
        advice = router.recommend_tier_upgrade("wf", "st")
    assert (advice.window, advice.current_tiers) == (20, (ModelTier.CHEAP,))


async def test_an_outcome_or_circuit_state_this_version_does_not_know_does_not_stop_a_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # written by a newer version or edited by hand: the row with the unknown outcome is
    # left out (with one warning naming the file), an unknown circuit state reads as unknown
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db) as backend:
        await backend.record_many(_tiered(30))
    conn = sqlite3.connect(db)
    try:
        conn.execute("UPDATE llm_calls SET outcome = 'deferred' WHERE call_id IN ('c20', 'c29')")
        conn.execute("UPDATE llm_calls SET circuit_state = 'quarantined' WHERE call_id = 'c28'")
        conn.commit()
    finally:
        conn.close()
    async with SQLiteTelemetryBackend(db) as backend:
        records = {r.call_id: r for r in await backend.recent(limit=30)}
        (performance,) = await backend.aggregate()
    assert len(records) == 28 and "c20" not in records and "c29" not in records
    assert (records["c28"].circuit_state, records["c28"].outcome) == (None, Outcome.SUCCESS)
    warned = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warned) == 1 and str(db) in warned[0] and "2 " in warned[0]
    assert performance.sample_size == 28  # the SQL counts the outcomes it knows
    async with AdaptiveModelRouter(None, f"sqlite:///{db}", refresh_interval=None) as router:
        advice = router.recommend_tier_upgrade("wf", "st")
    assert advice.current_tiers == (ModelTier.CHEAP,)


async def test_a_deleted_file_is_recreated_past_a_row_whose_outcome_this_version_does_not_know(
    tmp_path: Path,
) -> None:
    # the old file's rows are merged into the new one, the unknown outcome's row too
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db) as backend:
        await backend.record_many(_tiered(5))
        await backend.flush()
        conn = sqlite3.connect(db)
        try:
            conn.execute("UPDATE llm_calls SET outcome = 'deferred' WHERE call_id = 'c03'")
            conn.commit()
        finally:
            conn.close()
        os.unlink(db)  # what `rm calls.db` does while the program runs
        await backend.record_many(_tiered(7)[5:])
        await backend.flush()
        assert (backend.recreated, backend.failed) == (1, 0)
        assert len(await backend.recent(limit=10)) == 6
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM llm_calls").fetchone() == (7,)
    finally:
        conn.close()
