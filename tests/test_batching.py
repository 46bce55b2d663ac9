"""BatchingTelemetryBackend: write-behind over any backend, bounded, never losing on close."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import pytest_asyncio

from empathy_models import ConfigurationError, LLMCallRecord, telemetry_from_url
from empathy_models.abc import TelemetryBackend
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.backends._spool import Spool
from empathy_models.backends.batching import BatchingTelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.evidence import rollup
from empathy_models.exceptions import (
    BackendClosedError,
    RecordValidationError,
    TelemetryError,
    TelemetryRejectedError,
)
from empathy_models.records import ModelPerformance
from empathy_models.testing.contracts import TelemetryBackendContract, assert_same_buckets

BASE = datetime(2026, 2, 1, tzinfo=UTC)


def _records(n: int, prefix: str = "r", **fields: object) -> list[LLMCallRecord]:
    return [
        LLMCallRecord(
            provider="p",
            model="m",
            outcome="success",
            call_id=f"{prefix}{i}",
            timestamp=BASE + timedelta(seconds=i),
            latency_ms=float(i),
            **fields,  # type: ignore[arg-type]
        )
        for i in range(n)
    ]


class GatedBackend(MemoryTelemetryBackend):
    """A memory backend whose writes wait for a gate and can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.gate.set()
        self.entered = anyio.Event()
        self.wrote = anyio.Event()
        self.batches: list[int] = []
        self.fail_next = 0

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        self.entered.set()
        await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise TelemetryError("disk on fire", target="gated")
        self.batches.append(len(records))
        await super().record_many(records)
        self.wrote.set()

    def close_gate(self) -> None:
        self.gate = anyio.Event()
        self.entered = anyio.Event()


# --------------------------------------------------------------------------- contract


class TestBatchingOverMemory(TelemetryBackendContract):
    """The wrapper owes the same contract as the backend it wraps."""

    @pytest.fixture
    def telemetry_url(self) -> str:
        return "memory://"

    @pytest_asyncio.fixture(loop_scope="function")
    async def telemetry(
        self, telemetry_url: str, telemetry_options: dict[str, Any]
    ) -> AsyncIterator[TelemetryBackend]:
        async with BatchingTelemetryBackend(telemetry_url, max_batch=7, max_queue=50) as b:
            yield b


# --------------------------------------------------------------------------- behaviour


async def test_record_returns_while_the_backend_is_blocked() -> None:
    inner = GatedBackend()
    inner.close_gate()
    async with BatchingTelemetryBackend(inner, max_batch=100, max_queue=10_000) as batching:
        for r in _records(1000):
            await batching.record(r)  # would hang here if record() waited on the backend
        await inner.entered.wait()
        assert len(inner) == 0 and batching.pending > 0
        inner.gate.set()
        await batching.flush()
        assert len(inner) == 1000 and batching.pending == 0
        assert max(inner.batches) <= 100
        assert [r.call_id for r in await batching.recent(limit=3)] == ["r999", "r998", "r997"]


async def test_a_full_queue_makes_the_caller_wait_and_loses_nothing() -> None:
    inner = GatedBackend()
    inner.close_gate()
    done = anyio.Event()
    async with BatchingTelemetryBackend(
        inner, max_batch=5, max_queue=10, on_full="wait"
    ) as batching:

        async def producer() -> None:
            for r in _records(40):
                await batching.record(r)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await inner.entered.wait()
            await anyio.wait_all_tasks_blocked()
            assert not done.is_set(), "the producer must wait while the queue is full"
            assert batching.pending == 10 and batching.dropped == 0
            inner.gate.set()
        await batching.flush()
        assert len(inner) == 40 and batching.dropped == 0
        assert [r.call_id for r in await inner.recent(limit=40)][::-1] == [
            f"r{i}" for i in range(40)
        ]


async def test_the_drop_policy_counts_and_warns_once() -> None:
    inner = GatedBackend()
    inner.close_gate()
    batching = BatchingTelemetryBackend(inner, max_queue=10, on_full="drop")
    with pytest.warns(RuntimeWarning, match="queue is full") as caught:
        for r in _records(25):
            await batching.record(r)  # no await suspends here: the flusher has not run
    assert len(caught) == 1
    assert (batching.dropped, batching.pending) == (15, 10)
    inner.gate.set()
    await batching.flush()
    assert [r.call_id for r in await batching.recent()][::-1] == [f"r{i}" for i in range(10)]
    await batching.aclose()


async def test_a_failing_write_is_kept_retried_and_logged_once_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = GatedBackend()
    inner.fail_next = 3
    async with BatchingTelemetryBackend(inner, max_batch=3) as batching:
        with caplog.at_level(logging.WARNING, logger="empathy_models.telemetry"):
            await batching.record_many(_records(3, "kept"))
            await batching.flush()  # one attempt, failed: the records stay queued
            assert batching.pending == 3 and batching.written == 0
            await batching.record_many(_records(4, "more"))
            with anyio.fail_after(10):
                while batching.written < 7:
                    await batching.flush()
        assert (batching.failed, batching.written) == (0, 7)
        assert len(await batching.recent()) == 7
    messages = [r.getMessage() for r in caplog.records]
    assert sum("store is unavailable (TelemetryError: disk on fire)" in m for m in messages) == 1
    assert sum("store is back" in m for m in messages) == 1


async def test_batches_go_out_on_the_interval_without_a_flush() -> None:
    inner = GatedBackend()
    async with BatchingTelemetryBackend(inner, max_batch=1000, flush_interval=0.01) as batching:
        await batching.record(_records(1)[0])
        with anyio.fail_after(10):
            await inner.wrote.wait()  # the interval, not a flush or a full batch, sends it
        assert inner.batches == [1]


async def test_a_clean_close_writes_everything_queued(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    inner = SQLiteTelemetryBackend(db, batch=False)
    # close_timeout: what a close cannot write within it is spooled, not written (the
    # subject of other tests); on a loaded machine 3000 single-row SQLite writes can take
    # longer than the default 5 s, so this close gets all the time it needs
    batching = BatchingTelemetryBackend(
        inner, max_batch=50, max_queue=200, flush_interval=60, close_timeout=600
    )
    for r in _records(3000):
        await batching.record(r)
    await batching.aclose()
    assert inner.closed and batching.closed
    conn = sqlite3.connect(db)
    try:
        # every record once: none lost (distinct) and none written twice (all rows)
        assert conn.execute(
            "SELECT COUNT(DISTINCT call_id), COUNT(*) FROM llm_calls"
        ).fetchone() == (3000, 3000)
    finally:
        conn.close()
    with pytest.raises(
        BackendClosedError, match=r"is closed \(aclose\(\) was called.*build a new one"
    ):
        await batching.record(_records(1)[0])
    await batching.aclose()


async def test_close_while_writes_are_pending_waits_for_them() -> None:
    inner = GatedBackend()
    inner.close_gate()
    batching = BatchingTelemetryBackend(inner, max_batch=10)
    await batching.record_many(_records(35))
    async with anyio.create_task_group() as tg:
        tg.start_soon(batching.aclose)
        await inner.entered.wait()
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(BackendClosedError):
            await batching.record(_records(1)[0])  # closing: no new records
        inner.gate.set()
    assert inner.batches == [10, 10, 10, 5] and inner.closed


async def test_bad_input_is_rejected_before_anything_is_queued() -> None:
    async with BatchingTelemetryBackend(MemoryTelemetryBackend()) as batching:
        with pytest.raises(RecordValidationError):
            await batching.record_many([*_records(2), "nope"])  # type: ignore[list-item]
        with pytest.raises(RecordValidationError):
            await batching.record("nope")  # type: ignore[arg-type]
        assert batching.pending == 0 and await batching.recent() == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_batch": 0}, "max_batch must be an integer >= 1, got 0"),
        ({"max_queue": True}, "max_queue must be an integer >= 1, got True"),
        ({"flush_interval": 0}, "flush_interval must be a finite number > 0, got 0"),
        ({"on_full": "panic"}, "on_full must be 'spill', 'wait' or 'drop', got 'panic'"),
    ],
)
def test_settings_are_validated(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        BatchingTelemetryBackend(MemoryTelemetryBackend(), **options)
    with pytest.raises(ConfigurationError, match="TelemetryBackend or a URL"):
        BatchingTelemetryBackend(42)  # type: ignore[arg-type]


def test_wrapping_keeps_what_the_inner_backend_claims(tmp_path: Path) -> None:
    assert not BatchingTelemetryBackend("memory://").persistent
    wrapped = BatchingTelemetryBackend(f"sqlite:///{tmp_path}/x.db?batch=false")
    assert wrapped.persistent and isinstance(wrapped.inner, SQLiteTelemetryBackend)


class RefusingBackend(MemoryTelemetryBackend):
    """A memory backend that refuses any batch holding a record whose call_id starts 'bad'."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        self.writes += 1
        if any(r.call_id.startswith("bad") for r in records):
            raise TelemetryRejectedError("refused: a bad value", target="refusing")
        await super().record_many(records)


async def test_a_refused_batch_stores_every_other_record_and_gives_up_only_the_bad_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = RefusingBackend()
    records = _records(200)
    records[100] = attrs.evolve(records[100], call_id="bad100")
    async with BatchingTelemetryBackend(inner, max_batch=500) as batching:
        with caplog.at_level(logging.WARNING, logger="empathy_models.telemetry"):
            await batching.record_many(records)
            await batching.flush()
        assert (batching.written, batching.failed) == (199, 1)
    assert len(inner) == 199
    assert inner.writes <= 2 * 9 + 2  # halved down to the bad record, not one by one
    assert any(
        "bad100 was refused by the store and given up" in r.getMessage() for r in caplog.records
    )


async def test_spooled_records_replay_once_even_when_replayed_twice(
    tmp_path: Path, empathy_home: Path
) -> None:
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db) as backend:
        await backend.recent()
    spool = Spool(f"sqlite:{db}")
    records = _records(50)
    spool.write(records)
    directory = spool.directory
    assert directory.is_relative_to(empathy_home)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    (path,) = spool.files()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    copy = path.with_name("copy-" + path.name)
    copy.write_bytes(path.read_bytes())  # the same records twice, as after a crash
    async with SQLiteTelemetryBackend(db) as backend:
        await backend.flush()  # opening replays the spool
        assert len(await backend.recent(limit=1000)) == 50
        # and the rollups count each record once
        assert_same_buckets((await backend.evidence()).buckets, rollup(records), "replayed")
    assert spool.files() == []


def test_the_engine_constants_stay_importable_from_batching() -> None:
    from empathy_models.backends import batching

    assert 0 < batching.MIN_BACKOFF < batching.MAX_BACKOFF
    assert batching.DEFAULT_MAX_BATCH <= batching.DEFAULT_MAX_QUEUE


async def test_the_store_writer_warns_once_per_outage_and_once_on_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from empathy_models.backends._batch_writer import _Ledger, _StoreWriter

    async def down(records: list[LLMCallRecord]) -> None:
        raise TelemetryError("the store is down")

    ledger = _Ledger("test-owner")
    writer = _StoreWriter(down, ledger, kept="in memory up to 10")
    batch = _records(3)
    caplog.set_level(logging.WARNING, logger="empathy_models.telemetry")
    assert await writer.deliver(batch) == batch
    writer.fault()
    assert await writer.deliver(batch) == batch
    writer.fault()
    started = writer.outage_since
    assert writer.faults == 2 and started is not None
    assert isinstance(writer.last_fault, TelemetryError)
    assert writer.recovered() and writer.outage_since is None
    assert not writer.recovered()  # no outage to end
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is unavailable" in m for m in messages) == 1
    assert sum("is back after" in m for m in messages) == 1
    assert (ledger.written, ledger.failed) == (0, 0)


async def _spill_under_umask_0(tmp_path: Path) -> None:
    """Spool five records with a umask that narrows nothing: the database's directory is
    missing, every write fails and aclose() spools them."""
    telemetry = telemetry_from_url(
        f"sqlite:///{tmp_path / 'missing' / 'calls.db'}", close_timeout=0.5
    )
    old = os.umask(0)
    try:
        await telemetry.record_many(_records(5))  # queued: opening the store would fail
        await telemetry.aclose()
    finally:
        os.umask(old)


def _modes(home: Path) -> tuple[dict[str, int], set[int]]:
    """The modes of ``home`` and the directories under it (by path), and of its files."""
    made = [home, *home.rglob("*")]
    directories = {p.relative_to(home).as_posix(): p for p in made if p.is_dir()}
    files = {stat.S_IMODE(p.stat().st_mode) for p in made if p.is_file()}
    return {k: stat.S_IMODE(p.stat().st_mode) for k, p in directories.items()}, files


async def test_every_directory_the_spool_creates_is_private_under_any_umask(
    tmp_path: Path, empathy_home: Path
) -> None:
    # $EMPATHY_HOME, its spool/ and the store's directory (mkdir's mode= reaches the last)
    await _spill_under_umask_0(tmp_path)
    directories, files = _modes(empathy_home)
    assert len(directories) == 3 and {".", "spool"} <= set(directories)
    assert set(directories.values()) == {0o700}
    assert files == {0o600}


async def test_the_spool_leaves_an_existing_home_as_it_is(
    tmp_path: Path, empathy_home: Path
) -> None:
    os.mkdir(empathy_home)
    os.chmod(empathy_home, 0o755)  # the user's own choice for a directory they made
    await _spill_under_umask_0(tmp_path)
    directories, _ = _modes(empathy_home)
    assert directories.pop(".") == 0o755
    assert set(directories.values()) == {0o700}


class FlakySQLite(SQLiteTelemetryBackend):
    """An unbatched SQLite backend whose ``fail_on``-th write (1-based) fails once."""

    def __init__(self, path: Path, fail_on: int) -> None:
        super().__init__(path, batch=False)
        self.fail_on = fail_on
        self.writes = 0

    @property
    def spool_target(self) -> str:
        return f"flaky:{self.path}"

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        self.writes += 1
        if self.writes == self.fail_on:
            raise TelemetryError("the disk hiccuped", target=self.path)
        await super().record_many(records)


async def test_a_replay_failing_partway_counts_every_record_once(
    tmp_path: Path, empathy_home: Path
) -> None:
    inner = FlakySQLite(tmp_path / "calls.db", fail_on=2)  # the replay's second chunk
    spool = Spool(inner.spool_target)
    records = _records(30)
    spool.write(records)
    (path,) = spool.files()
    with path.open("a", encoding="utf-8") as f:
        f.write("not a record\n")
    async with BatchingTelemetryBackend(inner, max_batch=10) as batching:
        with anyio.fail_after(30):
            while spool.files() or batching.pending:
                await batching.flush()
        assert inner.writes == 4  # the chunk written before the failure was not written again
        assert (batching.written, batching.failed) == (30, 1)
        assert len(await inner.recent(limit=100)) == 30


# ------------------------------------------- a record the store fails on, not a refusal


def _fails_on_poison(records: Sequence[LLMCallRecord]) -> None:
    # a third-party backend's own error, which says neither "refused" nor "store down"
    if any(r.call_id.startswith("poison") for r in records):
        raise RuntimeError("the driver cannot encode this record")


class ChokingSQLite(SQLiteTelemetryBackend):
    """An unbatched SQLite backend whose writes fail for any batch holding a poison record."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, batch=False)

    @property
    def spool_target(self) -> str:
        return f"choking:{self.path}"

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        _fails_on_poison(records)
        await super().record_many(records)


class ChokingMemory(MemoryTelemetryBackend):
    """A memory backend (no spool) that fails likewise, and keeps the order of its writes;
    with ``down`` set it fails every write, as a store that is down."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []
        self.down = False

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        if self.down:
            raise RuntimeError("connection lost")
        _fails_on_poison(records)
        self.order.extend(r.call_id for r in records)
        await super().record_many(records)


def _given_up(caplog: pytest.LogCaptureFixture, call_id: str) -> list[str]:
    return [
        m
        for m in (r.getMessage() for r in caplog.records)
        if f"record {call_id} failed alone" in m and "given up" in m
    ]


async def test_a_spooled_record_the_store_keeps_failing_on_holds_up_no_new_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "calls.db"
    async with BatchingTelemetryBackend(
        ChokingSQLite(db), max_batch=10, close_timeout=0.5
    ) as first:
        await first.record_many([*_records(1, "poison"), *_records(9, "old")])
        await first.flush()
    assert first.spooled >= 1  # the poison record waits in the spool for the next open
    inner = ChokingSQLite(db)
    new = _records(60, "new")
    caplog.set_level(logging.WARNING, logger="empathy_models.telemetry")
    async with BatchingTelemetryBackend(inner, max_batch=10, max_queue=20) as batching:
        with anyio.fail_after(60):
            for k in range(0, len(new), 10):
                await batching.record_many(new[k : k + 10])
                await batching.flush()  # the spool is replayed first, and fails
                stored = {r.call_id for r in await inner.recent(limit=1000)}
                assert {r.call_id for r in new[: k + 10]} <= stored, "new records held up"
        # nothing spilled behind it; the poison record was given up, visibly, once
        assert (batching.spooled, batching.failed) == (0, 1)
    assert Spool(inner.spool_target).files() == []
    (message,) = _given_up(caplog, "poison0")
    assert "RuntimeError: the driver cannot encode this record" in message
    async with SQLiteTelemetryBackend(db) as reader:
        stored = {r.call_id for r in await reader.recent(limit=1000)}
    assert stored == {r.call_id for r in _records(9, "old") + new}


async def test_a_replay_writes_the_rest_of_a_spool_file_past_a_record_the_store_fails_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inner = ChokingSQLite(tmp_path / "calls.db")
    spool = Spool(inner.spool_target)
    spooled = _records(25, "old")
    spooled[7] = attrs.evolve(spooled[7], call_id="poison7")
    spool.write(spooled)  # as a process that met the store down left it
    caplog.set_level(logging.WARNING, logger="empathy_models.telemetry")
    async with BatchingTelemetryBackend(inner, max_batch=10) as batching:
        await batching.record_many(_records(5, "new"))
        await batching.flush()
        stored = {r.call_id for r in await inner.recent(limit=1000)}
        assert stored == {r.call_id for r in spooled + _records(5, "new")} - {"poison7"}
        assert [r.call_id for r in spool.read(spool.files()[0])[0]] == ["poison7"]
        with anyio.fail_after(60):
            k = 0
            while batching.failed == 0:
                await batching.record(_records(1, f"more{k}-")[0])
                await batching.flush()
                k += 1
    assert spool.files() == [] and len(_given_up(caplog, "poison7")) == 1


def _outage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in (r.getMessage() for r in caplog.records) if "unavailable" in m]


@pytest.mark.parametrize("max_batch", [7, 1])
async def test_spooled_records_the_store_fails_on_hold_up_no_other_spooled_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, max_batch: int
) -> None:
    # Two records the store fails on, each in a spool file of its own, and then records
    # a process that met the store down left in the spool: with the store up and no new
    # records, those are written, and no outage is announced.
    inner = ChokingSQLite(tmp_path / "calls.db")
    spool = Spool(inner.spool_target)
    poison, spooled = _records(2, "poison"), _records(2, "spooled")
    for records in ([poison[0]], [poison[1]], spooled):
        spool.write(records)
    caplog.set_level(logging.WARNING, logger="empathy_models.telemetry")
    async with BatchingTelemetryBackend(inner, max_batch=max_batch) as batching:
        with anyio.fail_after(60):
            for _ in range(5):
                await batching.flush()
        stored = {r.call_id for r in await inner.recent(limit=1000)}
        assert stored == {r.call_id for r in spooled}, "spooled records held up"
        new: list[LLMCallRecord] = []
        with anyio.fail_after(60):
            while batching.failed < 2:  # each fails alone a third time
                new += _records(1, f"new{len(new)}-")
                await batching.record(new[-1])
                await batching.flush()
        assert (batching.written, batching.failed) == (len(spooled) + len(new), 2)
    assert spool.files() == []
    assert len(_given_up(caplog, "poison0")) == len(_given_up(caplog, "poison1")) == 1
    assert _outage_warnings(caplog) == []


async def test_records_the_store_fails_on_announce_no_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # batches that each hold a record the store fails on (held back in the spool) among
    # records it takes: the store never stops taking records, and is never said down
    inner = ChokingSQLite(tmp_path / "calls.db")
    caplog.set_level(logging.WARNING, logger="empathy_models.telemetry")
    accepted: list[LLMCallRecord] = []
    async with BatchingTelemetryBackend(inner, max_batch=10) as batching:
        with anyio.fail_after(60):
            for k in range(3):
                batch = [*_records(1, f"poison{k}-"), *_records(5, f"old{k}-")]
                accepted += batch[1:]
                await batching.record_many(batch)
                await batching.flush()
            while batching.failed < 3:
                accepted += _records(1, f"new{len(accepted)}-")
                await batching.record(accepted[-1])
                await batching.flush()
        stored = {r.call_id for r in await inner.recent(limit=1000)}
    assert stored == {r.call_id for r in accepted}
    assert Spool(inner.spool_target).files() == []
    assert _outage_warnings(caplog) == []


@pytest.mark.parametrize("where", ["spool", "queue"])
@pytest.mark.parametrize("max_batch", [8, 3])
async def test_two_adjacent_records_the_store_fails_on_announce_no_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str, max_batch: int
) -> None:
    # two records the store fails on side by side, among records it takes, in one spool
    # file or one batch: a failure right after a failure there is not the store down
    inner = ChokingSQLite(tmp_path / "calls.db")
    before, poison, after = _records(1, "before"), _records(2, "poison"), _records(3, "after")
    if where == "spool":
        Spool(inner.spool_target).write([*before, *poison, *after])
    caplog.set_level(logging.WARNING, logger="empathy_models.telemetry")
    accepted = before + after
    async with BatchingTelemetryBackend(inner, max_batch=max_batch) as batching:
        with anyio.fail_after(60):
            if where == "queue":
                await batching.record_many([*before, *poison, *after])
            await batching.flush()
            stored = {r.call_id for r in await inner.recent(limit=1000)}
            assert stored == {r.call_id for r in accepted}
            while batching.failed < 2:  # each fails alone a third time
                accepted += _records(1, f"new{len(accepted)}-")
                await batching.record(accepted[-1])
                await batching.flush()
        stored = {r.call_id for r in await inner.recent(limit=1000)}
    assert stored == {r.call_id for r in accepted}
    assert Spool(inner.spool_target).files() == []
    assert len(_given_up(caplog, "poison0")) == len(_given_up(caplog, "poison1")) == 1
    assert _outage_warnings(caplog) == []


@pytest.mark.parametrize("max_batch", [10, 1])  # 1: a batch of the held record and one more
async def test_without_a_spool_the_queue_goes_on_past_a_record_the_store_keeps_failing_on(
    max_batch: int, caplog: pytest.LogCaptureFixture
) -> None:
    inner = ChokingMemory()  # not persistent: no spool, the record is held in the queue
    records = _records(30)
    records[12] = attrs.evolve(records[12], call_id="poison12")
    caplog.set_level(logging.WARNING, logger="empathy_models.telemetry")
    async with BatchingTelemetryBackend(inner, max_batch=max_batch) as batching:
        with anyio.fail_after(60):
            for k in range(0, len(records), 5):
                await batching.record_many(records[k : k + 5])
                await batching.flush()
        assert (batching.failed, batching.written) == (1, 29)
    # every other record written, in the order accepted
    assert inner.order == [r.call_id for r in records if r.call_id != "poison12"]
    assert len(_given_up(caplog, "poison12")) == 1


async def test_a_store_down_with_errors_of_its_own_loses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # every write fails, with the same kind of error as a poison record, for a while:
    # an outage, not records to give up
    inner = ChokingMemory()
    records = _records(40)
    caplog.set_level(logging.WARNING, logger="empathy_models.telemetry")
    async with BatchingTelemetryBackend(inner, max_batch=10) as batching:
        await batching.record_many(records[:10])
        await batching.flush()
        inner.down = True
        for k in range(10, len(records), 5):
            await batching.record_many(records[k : k + 5])
            await batching.flush()
        assert batching.written == 10
        inner.down = False
        with anyio.fail_after(60):
            while batching.written < len(records):
                await batching.flush()
        assert batching.failed == 0
    assert inner.order == [r.call_id for r in records]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable (RuntimeError: connection lost)" in m for m in messages) == 1
    assert sum("is back after" in m for m in messages) == 1


class StoreDriverError(Exception):
    """A third-party driver's one error type, for the store down and a record it cannot take."""


class OwnErrorStore(TelemetryBackend):
    """
    A store written against the public ABC that raises `StoreDriverError` for everything:
    with ``down`` set for every write (the store unreachable), else for a batch holding a
    poison record.  ``writes`` lists each record as written, in order.
    """

    def __init__(self) -> None:
        self.down = False
        self.writes: list[str] = []

    @property
    def persistent(self) -> bool:
        return True

    @property
    def spool_target(self) -> str:
        return f"own-error-store:{id(self)}"

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        if self.down:
            raise StoreDriverError("connection lost")
        if any(r.call_id.startswith("poison") for r in records):
            raise StoreDriverError("cannot encode the record")
        self.writes.extend(r.call_id for r in records if r.call_id not in self.writes)

    async def _aggregate(self, **filters: Any) -> list[ModelPerformance]:
        raise NotImplementedError  # never read here

    async def _recent(self, **filters: Any) -> list[LLMCallRecord]:
        raise NotImplementedError

    async def _purge(self, *, before: datetime) -> int:
        raise NotImplementedError


@pytest.mark.parametrize("spool", [False, True])
@pytest.mark.parametrize("max_batch", [10, 1])
async def test_a_store_back_with_records_it_fails_on_at_the_head_writes_every_other(
    max_batch: int, spool: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # The store fails with its own error while it is down, and then, back, with the same
    # error for the first and the newest record of the head batch: that is no proof the
    # store is up, yet the queue has to move on, the two counted as records the store
    # fails on alone (given up at their third failure alone).
    inner = OwnErrorStore()
    before, during = _records(10, "before"), _records(8, "during")
    poison = _records(2, "poison")
    accepted = before + during
    caplog.set_level(logging.WARNING, logger="empathy_models.telemetry")
    async with BatchingTelemetryBackend(inner, max_batch=max_batch, spool=spool) as batching:
        await batching.record_many(before)
        await batching.flush()
        inner.down = True
        await batching.record_many([poison[0], *during, poison[1]])
        await batching.flush()
        await batching.flush()
        inner.down = False  # back, a record it cannot take first in the queue
        with anyio.fail_after(60):
            for k in range(30):  # bounded: a queue held up fails the counts below
                new = _records(5, f"after{k}-")
                accepted += new
                await batching.record_many(new)
                await batching.flush()
                if batching.failed == 2:
                    break
            await batching.flush()
        counts = (batching.written, batching.failed, batching.pending)
        assert counts == (len(accepted), 2, 0), "records held up behind the head record"
    assert sorted(inner.writes) == sorted(r.call_id for r in accepted)  # each once, none lost
    assert len(_given_up(caplog, "poison0")) == len(_given_up(caplog, "poison1")) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable (StoreDriverError: connection lost)" in m for m in messages) == 1
    if spool:
        assert Spool(inner.spool_target).files() == []


@pytest.mark.parametrize("spool", [False, True])
@pytest.mark.parametrize("max_batch", [3, 1])
async def test_a_store_back_with_a_batch_of_records_it_fails_on_at_the_head_moves_on(
    max_batch: int, spool: bool
) -> None:
    # Back after an outage, the store fails with its own error on every record of the
    # batch at the head of the queue, each probe included: the retries have to reach
    # the records behind them, or the queue is held up for good.
    inner = OwnErrorStore()
    poison = _records(max(max_batch, 2), "poison")
    accepted = _records(3, "during")
    async with BatchingTelemetryBackend(inner, max_batch=max_batch, spool=spool) as batching:
        inner.down = True
        await batching.record_many([*poison, *accepted])
        await batching.flush()
        inner.down = False
        with anyio.fail_after(60):
            for k in range(30):  # bounded: a queue held up fails the count below
                accepted += _records(1, f"after{k}-")
                await batching.record(accepted[-1])
                await batching.flush()
                if batching.failed == len(poison):
                    break
            await batching.flush()
        assert batching.written == len(accepted), "records held up behind the head batch"
        assert (batching.failed, batching.pending) == (len(poison), 0)
    assert sorted(inner.writes) == sorted(r.call_id for r in accepted)
    if spool:
        assert Spool(inner.spool_target).files() == []


async def test_a_store_down_with_errors_of_its_own_is_announced_by_the_replay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a spool holding records held back and others, replayed while the store is down
    # with the error it fails records with: an outage, nothing given up or lost
    inner = OwnErrorStore()
    spool = Spool(inner.spool_target)
    spooled, held = _records(6, "spooled"), _records(2, "held")
    spool.write(spooled)
    for record in held:
        spool.write([record], held=True)
    inner.down = True
    caplog.set_level(logging.WARNING, logger="empathy_models.telemetry")
    async with BatchingTelemetryBackend(inner, max_batch=4) as batching:
        for _ in range(3):
            await batching.flush()
        assert inner.writes == []
        inner.down = False
        with anyio.fail_after(60):
            while spool.files():
                await batching.flush()
        assert batching.failed == 0
    assert sorted(inner.writes) == sorted(r.call_id for r in spooled + held)
    assert len(_outage_warnings(caplog)) == 1


@pytest.mark.parametrize(
    ("on_full", "spool", "said"),
    [
        ("spill", True, "(in memory up to 10, then in the spool)"),
        ("spill", False, "(in memory up to 10; past that the caller waits for room)"),
        ("wait", True, "(in memory up to 10; past that the caller waits for room)"),
        ("drop", True, "(in memory up to 10; past that new records are dropped)"),
    ],
)
async def test_the_outage_warning_says_what_happens_past_the_queue(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    on_full: Any,
    spool: bool,
    said: str,
) -> None:
    monkeypatch.setenv("EMPATHY_HOME", str(tmp_path / "home"))

    class Failing(SQLiteTelemetryBackend):  # persistent: it may have a spool
        async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
            raise TelemetryError("disk on fire")

    inner = Failing(str(tmp_path / "calls.db"))
    batching = BatchingTelemetryBackend(
        inner, max_queue=10, on_full=on_full, spool=spool, close_timeout=600
    )
    with caplog.at_level(logging.WARNING, logger="empathy_models.telemetry"):
        await batching.record_many(_records(3))
        await batching.flush()
        (warning,) = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
        assert warning.endswith(f"records are kept and retried {said}"), warning
        await batching.aclose()  # the store is down for good: the records are given up


_FLUSH_AFTER_CANCEL = """
import asyncio
from datetime import UTC, datetime
from empathy_models import LLMCallRecord
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.backends.batching import BatchingTelemetryBackend

async def main():
    inner = MemoryTelemetryBackend()
    async with BatchingTelemetryBackend(inner, flush_interval=60) as backend:
        await backend.record(LLMCallRecord(
            provider="p", model="m", outcome="success", timestamp=datetime.now(UTC)
        ))
        for _ in range(5):  # the flusher waits for the batch to fill
            await asyncio.sleep(0)
        # what asyncio.run does on a second Ctrl-C: every other task cancelled
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        await backend.flush()
        print(len(await inner.recent()))

asyncio.run(main())
"""


def test_a_flush_after_the_flusher_was_cancelled_from_outside_writes_and_returns() -> None:
    # in a child process: the flush spun without ever yielding, so nothing in the
    # event loop could time it out (a double Ctrl-C hung `empathy-models demo`)
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _FLUSH_AFTER_CANCEL],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "1\n"), result.stderr


async def test_a_flush_after_the_flusher_was_cancelled_in_the_middle_of_a_batch_writes_it() -> None:
    # a flusher cancelled from outside while writing (as asyncio.run cancels every task
    # at a second Ctrl-C) left its batch neither queued nor written: a flush (the one
    # an executor's close makes) restarted the flusher and waited for it for ever
    inner = GatedBackend()
    inner.close_gate()
    async with BatchingTelemetryBackend(inner, flush_interval=0.01) as batching:
        await batching.record_many(_records(3))
        await inner.entered.wait()  # the flusher is writing the batch
        for task in asyncio.all_tasks():
            if task.get_name().startswith("empathy-models telemetry flusher"):
                task.cancel()
        await asyncio.sleep(0)
        inner.gate.set()
        with anyio.fail_after(10):
            await batching.flush()
        assert sorted(r.call_id for r in await inner.recent()) == ["r0", "r1", "r2"]
