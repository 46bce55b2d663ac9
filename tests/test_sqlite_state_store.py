"""SQLiteStateStore: the contract suite (file and :memory:) plus SQLite specifics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from empathy_models import BreakerPolicy, CircuitState, Outcome
from empathy_models.backends import state_store_from_url
from empathy_models.backends.sqlite import SQLiteStateStore
from empathy_models.exceptions import SchemaVersionError, StateStoreError
from empathy_models.records import CircuitBreakerState, OutcomeReport
from empathy_models.testing.clock import FakeClock
from empathy_models.testing.contracts import (
    AdvanceClock,
    CircuitStateStoreContract,
    StepStateClock,
    stepping,
)


class TestSQLiteFileStateStore(CircuitStateStoreContract):
    @pytest.fixture
    def state_store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/state.db"

    @pytest.fixture
    def state_store_options(self, fake_clock: FakeClock) -> dict[str, Any]:
        return {"clock": fake_clock}

    @pytest.fixture
    def advance_clock(self, fake_clock: FakeClock) -> AdvanceClock:
        return fake_clock.sleep

    @pytest.fixture
    def step_state_clock(self, fake_clock: FakeClock) -> StepStateClock:
        return stepping(fake_clock)


class TestSQLiteMemoryStateStore(CircuitStateStoreContract):
    @pytest.fixture
    def state_store_url(self) -> str:
        return "sqlite://:memory:"

    @pytest.fixture
    def state_store_options(self, fake_clock: FakeClock) -> dict[str, Any]:
        return {"clock": fake_clock}

    @pytest.fixture
    def advance_clock(self, fake_clock: FakeClock) -> AdvanceClock:
        return fake_clock.sleep

    @pytest.fixture
    def step_state_clock(self, fake_clock: FakeClock) -> StepStateClock:
        return stepping(fake_clock)


# --------------------------------------------------------------------------- specifics

POLICY = BreakerPolicy(consecutive_failures=3, minimum_calls=1_000)


async def _fail(store: SQLiteStateStore, key: str, n: int) -> CircuitBreakerState:
    state = await store.snapshot(key)
    for _ in range(n):
        admission = await store.admit(key, POLICY)
        assert admission.admitted and admission.ticket is not None
        report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE)
        state = await store.record(key, POLICY, [report])
    return state


async def test_state_is_stored_as_versioned_json_with_its_generation(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    db = tmp_path / "state.db"
    async with SQLiteStateStore(db, clock=fake_clock) as store:
        opened = await _fail(store, "prov", 3)
        assert opened.state is CircuitState.OPEN and opened.updated_at_ts == fake_clock.now
    conn = sqlite3.connect(db)
    try:
        key, generation, state, data, updated = conn.execute(
            "SELECT key, generation, state, data, updated_at FROM circuit_state"
        ).fetchone()
    finally:
        conn.close()
    assert (key, generation, state, updated) == ("prov", 1, "open", fake_clock.now)
    assert CircuitBreakerState.from_dict(json.loads(data)) == opened
    assert json.loads(data)["v"] >= 1
    # and it is still there for the next process
    async with state_store_from_url(f"sqlite:///{db}", clock=fake_clock) as again:
        assert await again.snapshot("prov") == opened
        assert not (await again.admit("prov", POLICY)).admitted


async def test_two_connections_in_one_process_count_exactly(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    policy = BreakerPolicy(consecutive_failures=10_000, minimum_calls=10_000)
    async with SQLiteStateStore(db) as a, SQLiteStateStore(db, busy_timeout=0.0) as b:

        async def fail(store: SQLiteStateStore) -> None:
            for _ in range(40):
                admission = await store.admit("k", policy)
                assert admission.ticket is not None
                await store.record(
                    "k", policy, [OutcomeReport(ticket=admission.ticket, outcome="failure")]
                )

        async with anyio.create_task_group() as tg:
            for store in (a, b, a, b):
                tg.start_soon(fail, store)
        assert (await a.snapshot("k")).failure_count == 160
        assert (await b.snapshot("k")).failure_count == 160


async def test_memory_stores_are_private(fake_clock: FakeClock) -> None:
    async with (
        state_store_from_url("sqlite://:memory:", clock=fake_clock) as one,
        state_store_from_url("sqlite:///:memory:", clock=fake_clock) as two,
    ):
        assert not one.shared and not two.shared
        await one.force("k", CircuitState.FORCED_OPEN)
        assert (await two.snapshot("k")).state is CircuitState.CLOSED
    file_store = SQLiteStateStore("x.db")
    assert file_store.shared
    await file_store.aclose()


async def test_a_cancelled_caller_leaves_no_half_done_transaction(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    async with SQLiteStateStore(db) as store:
        await _fail(store, "k", 1)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await store.admit("k", POLICY)  # cancelled before its job starts
        for _ in range(20):
            with anyio.move_on_after(0):
                await _fail(store, "k", 1)
        state = await _fail(store, "k", 1)
        assert (state.state, state.failure_count, state.generation) == (CircuitState.CLOSED, 2, 0)
        assert (await store.force("k", CircuitState.CLOSED)).state is CircuitState.CLOSED


@pytest.mark.parametrize("case", ["missing directory", "directory", "corrupt", "read-only"])
async def test_unusable_paths_raise_a_state_store_error_naming_the_path(
    tmp_path: Path, case: str
) -> None:
    path = tmp_path / "state.db"
    if case == "missing directory":
        path = tmp_path / "missing" / "state.db"
    elif case == "directory":
        path.mkdir()
    elif case == "corrupt":
        path.write_bytes(random.Random(11).randbytes(4096))
    else:
        async with SQLiteStateStore(path) as store:
            await store.force("k", CircuitState.FORCED_OPEN)
        path.chmod(0o400)
    store = SQLiteStateStore(path)
    try:
        with anyio.fail_after(20):
            with pytest.raises(StateStoreError) as info:
                await store.admit("k", POLICY)
            with pytest.raises(StateStoreError):
                await store.snapshot("k")
    finally:
        await store.aclose()
        if case == "read-only":
            path.chmod(0o600)
    assert str(path) in str(info.value) and info.value.target == str(path)
    expected = {
        "missing directory": "does not exist",
        "directory": "directory",
        "corrupt": "not a SQLite database",
        "read-only": "read-only",
    }[case]
    assert expected in str(info.value)


async def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    store = SQLiteStateStore(db)
    with pytest.raises(SchemaVersionError, match="schema version 99") as info:
        await store.snapshot_all()
    await store.aclose()
    assert info.value.target == str(db) and str(db) in str(info.value)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 99
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
    finally:
        conn.close()


async def test_reads_never_wait_for_a_writer_and_writes_report_a_held_lock(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    async with SQLiteStateStore(db, busy_timeout=0.0, lock_timeout=0.0) as store:
        await _fail(store, "k", 1)
        blocker = sqlite3.connect(db, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process is writing
            admission = await store.admit("k", POLICY)  # CLOSED: changes nothing, no lock
            assert admission.admitted and admission.ticket is not None
            assert (await store.snapshot("k")).failure_count == 1
            report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE)
            with pytest.raises(StateStoreError, match="stayed locked") as info:
                await store.record("k", POLICY, [report])
            assert info.value.target == str(db)
            blocker.execute("ROLLBACK")
            assert (await store.record("k", POLICY, [report])).failure_count == 2
        finally:
            blocker.close()


# --------------------------------------------------------------------------- the optimistic path


def _write_state(
    db: Path, state: CircuitBreakerState, conn: sqlite3.Connection | None = None
) -> None:
    """What another process does: store ``state`` as its key's row."""
    own = conn is None
    conn = sqlite3.connect(db, isolation_level=None) if conn is None else conn
    try:
        conn.execute(
            "UPDATE circuit_state SET data = ?, generation = ? WHERE key = ?",
            (json.dumps(state.to_dict()), state.generation, state.key),
        )
    finally:
        if own:
            conn.close()


async def test_a_state_changed_between_the_read_and_the_write_is_not_overwritten(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    between: list[Callable[[], None]] = []

    def clock() -> float:  # read after the row, before the write
        if between:
            between.pop()()
        return time.time()

    async with SQLiteStateStore(db, clock=clock) as store:
        before = await _fail(store, "k", 1)
        admission = await store.admit("k", POLICY)
        assert admission.ticket is not None
        other = attrs.evolve(before, consecutive_failures=before.consecutive_failures + 5)
        between.append(lambda: _write_state(db, other))
        report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE)
        after = await store.record("k", POLICY, [report])
        assert after.consecutive_failures == other.consecutive_failures + 1 == 7
        assert await store.snapshot("k") == after
        assert not between


async def test_a_write_behind_another_writers_lock_waits_off_the_event_loop(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    async with SQLiteStateStore(db) as store:
        before = await _fail(store, "k", 1)
        admission = await store.admit("k", POLICY)
        assert admission.ticket is not None
        report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE)
        blocker = sqlite3.connect(db, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process is writing the key
            other = attrs.evolve(before, consecutive_failures=before.consecutive_failures + 5)
            _write_state(db, other, blocker)
            recording = asyncio.ensure_future(store.record("k", POLICY, [report]))
            started = time.monotonic()
            await asyncio.sleep(0.2)  # the loop runs while the write waits for the lock
            assert time.monotonic() - started < 2.0 and not recording.done()
            assert (await store.snapshot("k")) == before  # reads do not wait either
            blocker.execute("COMMIT")
            after = await asyncio.wait_for(recording, 10.0)
        finally:
            blocker.close()
        assert after.consecutive_failures == 7  # applied to what the other one wrote
        assert await store.snapshot("k") == after


async def test_the_write_ahead_log_is_checkpointed(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    policy = BreakerPolicy(consecutive_failures=10**9, minimum_calls=10**9)
    async with SQLiteStateStore(db) as store:
        for _ in range(4000):
            admission = await store.admit("k", policy)
            assert admission.ticket is not None
            report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE)
            await store.record("k", policy, [report])
        assert (await store.snapshot("k")).consecutive_failures == 4000
        # one page a write, 4,000 writes: 16 MB if nothing ever checkpointed
        assert (tmp_path / "state.db-wal").stat().st_size < 8 * 2**20


def _descriptors_of(path: Path) -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(str(path)):
                count += 1
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
async def test_aclose_closes_every_connection(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = SQLiteStateStore(db)
    async with store:
        await _fail(store, "k", 2)
        assert _descriptors_of(db) > 0
    assert _descriptors_of(db) == 0
