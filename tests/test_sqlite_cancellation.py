"""
SQLite backends under cancellation: asyncio's own (``Task.cancel``, ``asyncio.timeout``,
which anyio shields do not stop) and anyio's, at every point of a transaction; and the
connection's worker thread exists only between first use and ``aclose()``.

Each case cancels after a growing number of event-loop turns, so the cancellation lands
before, inside and after the transaction's statements without any timing assumption.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from empathy_models import BreakerPolicy, CircuitState, LLMCallRecord, Outcome
from empathy_models.backends.sqlite import SQLiteStateStore, SQLiteTelemetryBackend
from empathy_models.backends.sqlite._inloop import InLoop
from empathy_models.exceptions import TelemetryError
from empathy_models.records import OutcomeReport

POLICY = BreakerPolicy(consecutive_failures=1_000_000, minimum_calls=1_000_000)
TURNS = range(24)


def _another_writer_gets_the_lock(db: Path) -> bool:
    """True when another connection can take the write lock at once (no open transaction)."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def _connection_threads() -> set[threading.Thread]:
    """Threads that are neither the main thread nor anyio's pooled workers."""
    return {
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and t.name != "AnyIO worker thread"
    }


async def _threads_end(before: set[threading.Thread]) -> bool:
    """True when every thread started since ``before`` ends (they may be just exiting)."""
    for thread in _connection_threads() - before:
        await anyio.to_thread.run_sync(thread.join, 10.0)
    return _connection_threads() <= before


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _cancel_after(turns: int, how: str, op: Callable[[], Awaitable[object]]) -> bool:
    """Run ``op()``, cancelled ``how`` after ``turns`` loop turns; True if it returned."""
    finished = False
    if how == "Task.cancel":
        task = asyncio.ensure_future(op())
        await _turns(turns)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return False
        return True
    canceller = asyncio.ensure_future(_turns(turns))
    try:
        if how == "asyncio.timeout":
            loop = asyncio.get_running_loop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None) as timeout:

                    def expire(_: object) -> None:
                        if not finished:
                            timeout.reschedule(loop.time())

                    canceller.add_done_callback(expire)
                    await op()
                    finished = True
        else:
            with anyio.CancelScope() as scope:

                def cut(_: object) -> None:
                    if not finished:
                        scope.cancel()

                canceller.add_done_callback(cut)
                await op()
                finished = True
    finally:
        await canceller
    return finished


@pytest.mark.parametrize("how", ["Task.cancel", "asyncio.timeout", "anyio"])
async def test_a_cancelled_state_transaction_commits_whole_or_not_at_all(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the store's statements on the event loop's thread never suspend, so nothing can
    # cancel them half-way; this is about the connection's thread, where they go
    # when the loop's connection cannot take them (here: there is none)
    monkeypatch.setattr(InLoop, "_connect", lambda self: None)
    db = tmp_path / "state.db"
    returned = interrupted = 0
    async with SQLiteStateStore(db) as store:

        async def trial(turns: int) -> None:
            nonlocal returned, interrupted
            admission = await store.admit("k", POLICY)
            assert admission.ticket is not None
            reports = [OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE)]
            if await _cancel_after(turns, how, partial(store.record, "k", POLICY, reports)):
                returned += 1
            else:
                interrupted += 1
            # the next operation runs after whatever the cancelled one left queued
            await store.snapshot("k")
            assert _another_writer_gets_the_lock(db), f"a transaction was left open ({turns})"

        for turns in TURNS:
            await trial(turns)
        # where a cancel lands depends on the machine's load: on a busy machine every
        # one of the trials above may have finished first; try the shortest delays again
        extra = 0
        while interrupted == 0 and extra < 400:
            await trial(extra % 3)
            extra += 1
        count = (await store.snapshot("k")).failure_count
    assert returned + interrupted == len(TURNS) + extra
    assert interrupted > 0, "nothing was cancelled: the test tested nothing"
    # a transaction whose COMMIT was sent commits even though its caller was cancelled
    assert returned <= count <= returned + interrupted
    async with SQLiteStateStore(db) as again:
        assert (await again.snapshot("k")).failure_count == count


async def test_a_cancelled_telemetry_batch_is_stored_whole_or_not_at_all(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    when = datetime(2026, 1, 1, tzinfo=UTC)
    async with SQLiteTelemetryBackend(db, batch=False) as backend:
        for turns in TURNS:
            records = [
                LLMCallRecord(
                    provider="p",
                    model="m",
                    outcome=Outcome.SUCCESS,
                    call_id=f"{turns}:{i}",
                    timestamp=when,
                    latency_ms=1.0,
                )
                for i in range(300)
            ]
            task = asyncio.ensure_future(backend.record_many(records))
            await _turns(turns)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await backend.recent(limit=1)
            assert _another_writer_gets_the_lock(db), f"a transaction was left open ({turns})"
    conn = sqlite3.connect(db)
    try:
        sizes = conn.execute(
            "SELECT substr(call_id, 1, instr(call_id, ':')), COUNT(*) FROM llm_calls GROUP BY 1"
        ).fetchall()
    finally:
        conn.close()
    assert all(n == 300 for _, n in sizes), sizes


async def test_the_connection_thread_lives_from_first_use_to_aclose(tmp_path: Path) -> None:
    before = _connection_threads()
    never_used = SQLiteStateStore(tmp_path / "never.db")
    await never_used.aclose()
    assert _connection_threads() == before
    assert not (tmp_path / "never.db").exists()

    store = SQLiteStateStore(tmp_path / "state.db")
    await store.force("k", CircuitState.FORCED_OPEN)  # opened lazily, without async with
    assert len(_connection_threads() - before) == 1
    await store.aclose()
    assert await _threads_end(before)

    backend = SQLiteTelemetryBackend(tmp_path / "missing" / "calls.db")
    with pytest.raises(TelemetryError, match="does not exist"):
        await backend.recent()
    assert await _threads_end(before)  # a failed open leaves no thread behind
    await backend.aclose()


async def test_an_open_cancelled_at_any_point_leaves_no_thread(tmp_path: Path) -> None:
    before = _connection_threads()
    for turns in TURNS:
        store = SQLiteStateStore(tmp_path / f"s{turns}.db")
        task = asyncio.ensure_future(store.admit("k", POLICY))
        await _turns(turns)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.aclose()
    assert await _threads_end(before)
    # a sqlite3 connection left unclosed by a cancelled open would be collected here,
    # and from Python 3.13 warn (an error under this suite's filterwarnings)
    gc.collect()
