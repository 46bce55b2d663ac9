"""
Several OS processes sharing one SQLite file: one breaker, every record exactly once,
and a database that survives a writer killed with SIGKILL.

The children are ``tests/_workers/sqlite_worker.py`` started with `subprocess`; they
talk JSON lines over their pipes.  Breaker children take the store's clock from each
command, so nothing here waits for time to pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from empathy_models.backends.sqlite import SQLiteStateStore, SQLiteTelemetryBackend
from empathy_models.records import LLMCallRecord
from tests._workers import Child

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).parent / "_workers" / "sqlite_worker.py"
PROCESSES = 4
T0 = 1_800_000_000.0  # the breaker children's clock, UTC epoch seconds


def _child(*args: str) -> Child:
    return Child(WORKER, *args)


@contextmanager
def children(*argv: list[str]) -> Iterator[list[Child]]:
    started: list[Child] = []
    try:
        started.extend(_child(*args) for args in argv)
        for child in started:
            assert child.read() == {"ready": True}
        yield started
    finally:
        for child in started:
            child.close()


def broadcast(workers: list[Child], command: dict[str, Any]) -> list[dict[str, Any]]:
    """Send ``command`` to every worker at once, then collect every answer."""
    for w in workers:
        w.send(command)
    return [w.read() for w in workers]


def breakers(db: Path) -> Any:
    return children(*[["breaker", str(db)] for _ in range(PROCESSES)])


# --------------------------------------------------------------------------- breaker


def test_failures_from_four_processes_are_counted_exactly(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    policy = {"consecutive_failures": 100_000, "minimum_calls": 100_000}
    per_process = 150
    with breakers(db) as workers:
        answers = broadcast(
            workers, {"op": "fail", "key": "prov", "n": per_process, "now": T0, "policy": policy}
        )
        assert [a["admitted"] for a in answers] == [per_process] * PROCESSES
        snaps = broadcast(workers, {"op": "snapshot", "key": "prov", "now": T0})
        for w in workers:
            w.send({"op": "quit"})
            w.finish()
    total = per_process * PROCESSES
    for snap in snaps:
        state = snap["state"]
        assert state["state"] == "closed"
        assert state["consecutive_failures"] == total, "lost updates between processes"
        assert sum(bucket[2] for bucket in state["window"]) == total


def test_a_trip_in_one_process_is_open_in_every_other(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    policy = {"consecutive_failures": 5, "recovery_seconds": 60.0}
    with breakers(db) as workers:
        first, others = workers[0], workers[1:]
        first.send({"op": "fail", "key": "prov", "n": 5, "now": T0, "policy": policy})
        assert first.read() == {"admitted": 5, "rejected_states": []}
        command = {"op": "admit", "key": "prov", "n": 3, "now": T0 + 1, "policy": policy}
        for answer in broadcast(others, command):
            assert answer == {"leases": [], "rejected_states": ["open"] * 3}
        snaps = broadcast(others, {"op": "snapshot", "key": "prov", "now": T0 + 1})
        assert {s["state"]["state"] for s in snaps} == {"open"}
        assert {s["state"]["generation"] for s in snaps} == {1}

        # concurrently: every process fails until the shared breaker trips, then is refused
        concurrent = {"consecutive_failures": 40, "minimum_calls": 100_000}
        answers = broadcast(
            workers, {"op": "fail", "key": "other", "n": 60, "now": T0, "policy": concurrent}
        )
        assert sum(a["admitted"] for a in answers) >= 40
        assert all(a["rejected_states"] and set(a["rejected_states"]) == {"open"} for a in answers)
        (snap,) = broadcast(workers[:1], {"op": "snapshot", "key": "other", "now": T0})
        assert (snap["state"]["state"], snap["state"]["consecutive_failures"]) == ("open", 40)
        for w in workers:
            w.send({"op": "quit"})
            w.finish()


def test_half_open_grants_exactly_the_permitted_probes_across_processes(
    tmp_path: Path,
) -> None:
    db = tmp_path / "shared.db"
    policy = {
        "consecutive_failures": 3,
        "recovery_seconds": 60.0,
        "half_open_probes": 3,
        "probe_lease_seconds": 30.0,
    }
    with breakers(db) as workers:
        workers[0].send({"op": "fail", "key": "prov", "n": 3, "now": T0, "policy": policy})
        assert workers[0].read()["admitted"] == 3
        for now in (T0 + 61.0, T0 + 61.0 + 31.0):  # then again once those leases expired
            answers = broadcast(
                workers, {"op": "admit", "key": "prov", "n": 25, "now": now, "policy": policy}
            )
            leases = [lease for a in answers for lease in a["leases"]]
            assert len(leases) == 3, f"{len(leases)} probe leases granted across processes"
            assert None not in leases and len(set(leases)) == 3
            rejected = [s for a in answers for s in a["rejected_states"]]
            assert len(rejected) == 25 * PROCESSES - 3 and set(rejected) == {"half_open"}
        for w in workers:
            w.send({"op": "quit"})
            w.finish()


# --------------------------------------------------------------------------- telemetry


@pytest.mark.slow
def test_four_processes_write_40000_records_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    count = 10_000
    with children(
        *[["telemetry", str(db), str(i), str(count)] for i in range(PROCESSES)]
    ) as writers:
        for w in writers:
            w.send("go")
        results = [w.read(timeout=90) for w in writers]
        errors = [w.finish() for w in writers]
    for result, err in zip(results, errors, strict=True):
        assert result["done"] == count
        assert (result["failed"], result["dropped"]) == (0, 0)
        assert "locked" not in err.lower() and "Traceback" not in err, err

    conn = sqlite3.connect(db)
    try:
        total, distinct = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT call_id) FROM llm_calls"
        ).fetchone()
        ids = {row[0] for row in conn.execute("SELECT call_id FROM llm_calls")}
    finally:
        conn.close()
    assert (total, distinct) == (count * PROCESSES, count * PROCESSES)
    assert ids == {f"w{p}-{i}" for p in range(PROCESSES) for i in range(count)}

    async def read_back() -> int:
        async with SQLiteTelemetryBackend(db) as backend:
            return sum(p.sample_size for p in await backend.aggregate(workflow="mp"))

    assert asyncio.run(read_back()) == count * PROCESSES


def _wait_for_a_write_transaction(db: Path, child: Child) -> None:
    """
    Return once the child holds the database's write lock, i.e. is inside a batch's
    transaction: ``BEGIN IMMEDIATE`` without waiting fails exactly then.  When it
    succeeds instead (the child is between batches), it is rolled back at once and
    tried again.
    """
    probe = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        while True:
            if child.proc.poll() is not None:
                child.fail("exited before it was killed")
            try:
                probe.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    raise
                return
            probe.execute("ROLLBACK")
    finally:
        probe.close()


def _kill_mid_batch(db: Path, label: str, batch_size: int) -> list[int]:
    """
    Start a crash writer, let it commit some batches, then SIGKILL it while it holds
    the write lock, inside a batch's transaction.  Returns the batch ids it reported
    as committed.
    """
    child = _child("crash", str(db), str(batch_size), label)
    committed: list[int] = []
    try:
        while len(committed) < 3:
            committed.append(child.read()["committed"])
        _wait_for_a_write_transaction(db, child)
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(10)
        # whatever the child printed before dying was committed as well
        assert child.proc.stdout is not None
        tail = child._buffer + child.proc.stdout.read()
        committed += [json.loads(line)["committed"] for line in tail.splitlines() if line]
    finally:
        child.close()
    assert child.proc.returncode == -signal.SIGKILL
    assert committed == list(range(len(committed)))
    return committed


def test_writers_killed_mid_stream_leave_every_committed_batch(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    batch_size = 400
    reported = {label: _kill_mid_batch(db, label, batch_size) for label in ("a", "b")}

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        ids = [row[0] for row in conn.execute("SELECT call_id FROM llm_calls")]
    finally:
        conn.close()
    assert len(ids) == len(set(ids))
    per_batch: dict[tuple[str, int], int] = {}
    for call_id in ids:
        label, batch, _ = call_id.split(":")
        per_batch[label, int(batch)] = per_batch.get((label, int(batch)), 0) + 1
    for label, committed in reported.items():
        for batch in committed:
            assert per_batch.get((label, batch)) == batch_size, f"batch {label}:{batch} lost"
        # at most the batch in flight at the kill is there unreported
        present = {b for (lab, b) in per_batch if lab == label}
        assert present - set(committed) <= {len(committed)}
    partial = {key: n for key, n in per_batch.items() if n != batch_size}
    assert not partial, f"batches stored in part: {partial}"

    async def reopen() -> int:
        async with SQLiteTelemetryBackend(db) as backend:
            await backend.record_many([])
            return len(await backend.recent(limit=1_000_000))

    assert asyncio.run(reopen()) == len(ids)


# --------------------------------------------------------------------------- one file, two backends


def _calls(prefix: str, n: int) -> list[LLMCallRecord]:
    return [
        LLMCallRecord(provider="prov", model="m", outcome="success", call_id=f"{prefix}-{i}")
        for i in range(n)
    ]


def _quit(worker: Child) -> None:
    worker.send({"op": "quit"})
    worker.finish()


async def test_telemetry_and_circuit_state_in_one_file_lose_no_commit_to_other_processes(
    tmp_path: Path,
) -> None:
    # Opening a second backend on the file must not drop the POSIX locks this process's
    # first connection holds on it (closing any descriptor of the file drops them all):
    # another process closing the file would then take itself for the last user,
    # checkpoint and delete the WAL this process still commits into.
    db = tmp_path / "shared.db"
    async with SQLiteTelemetryBackend(db, batch=False) as telemetry:
        await telemetry.record_many(_calls("before", 10))
        async with SQLiteStateStore(db) as store:  # the same file, the same process
            await store.snapshot("prov")
        with children(["breaker", str(db)]) as (other,):  # another process opens, closes
            _quit(other)
        await telemetry.record_many(_calls("after", 10))
        # a third process has the file open while this one closes (any worker of a fleet)
        with children(["breaker", str(db)]) as (holder,):
            await telemetry.aclose()
            _quit(holder)
    conn = sqlite3.connect(db)
    try:
        ids = {row[0] for row in conn.execute("SELECT call_id FROM llm_calls")}
    finally:
        conn.close()
    assert ids == {f"{p}-{i}" for p in ("before", "after") for i in range(10)}
